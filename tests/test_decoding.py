"""shared.lm.decoding, the fast sampler behind HFGenerator: it draws from the model's own next-token
distribution (checked against the exact probabilities and against model.generate's draws) and decodes greedily
what model.generate decodes, on the tiny model in fp32."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import TopPLogitsWarper

from shared.lm import chat, models
from shared.lm.decoding import DecodeSettings, FastDecoder, sample_tokens, unsupported_reason
from shared.lm.generation import HFGenerator, SamplingParams

P_MIN = 1e-3  # a correct sampler fails a check at this level once in a thousand seeds; each check is seeded
USERS = ["Hi", "What is the capital of France? Answer briefly.", "x", "Tell me a story about a dragon, please."]


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of ``counts`` against ``probs``, bins expecting fewer than 5 draws pooled."""
    expected = probs.double() / probs.double().sum() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    expected = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(stats.chisquare(observed.numpy(), expected.numpy()).pvalue)


def two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chi-square p-value that two count vectors come from one distribution (bins with fewer than 10 draws in
    both samples together pooled)."""
    big = (a + b) >= 10
    table = torch.stack([torch.cat([a[big], a[~big].sum().reshape(1)]), torch.cat([b[big], b[~big].sum().reshape(1)])])
    table = table[:, table.sum(0) > 0]
    return float(stats.chi2_contingency(table.numpy()).pvalue)


# ---------------------------------------------------------------------------------------------------------------
# the sampling step


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (1.0, 0.5)])
def test_sampled_tokens_follow_the_softmax_and_transformers_nucleus(temperature, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0])
    # the known answer: transformers' own top-p warper on the tempered logits, then softmax
    filtered = TopPLogitsWarper(top_p)(None, (logits / temperature)[None])[0]
    probs = torch.softmax(filtered, dim=-1)
    rows = 40_000
    tokens = sample_tokens(logits.expand(rows, -1).contiguous(), temperature, top_p,
                           torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=len(logits))
    assert counts[probs == 0].sum() == 0, "a token outside the nucleus was drawn"
    assert goodness_of_fit(counts[probs > 0], probs[probs > 0]) > P_MIN


def test_a_wrong_distribution_fails_the_same_check():
    """The check has power: draws from a distribution with one token's probability 10% too high are rejected."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0])
    probs = torch.softmax(logits, dim=-1)
    skewed = probs.clone()
    skewed[0] *= 1.10
    tokens = sample_tokens(skewed.log().expand(40_000, -1).contiguous(), 1.0, 1.0, torch.Generator().manual_seed(0))
    assert goodness_of_fit(torch.bincount(tokens, minlength=8), probs) < P_MIN


def test_tokens_of_probability_zero_are_never_drawn():
    logits = torch.tensor([0.0, 0.0, float("-inf"), 1.0, float("-inf")])
    tokens = sample_tokens(logits.expand(20_000, -1).contiguous(), 1.0, 1.0, torch.Generator().manual_seed(1))
    assert set(tokens.tolist()) == {0, 1, 3}


def test_temperature_zero_is_the_argmax_of_each_row():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_tokens(logits, 0.0, 1.0, None), logits.argmax(-1))


def test_the_same_generator_state_gives_the_same_draws():
    logits = torch.randn(64, 50)
    draw = [sample_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*draw)


# ---------------------------------------------------------------------------------------------------------------
# decoding the tiny model


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny:qwen2", device="cpu"), models.load_tokenizer("tiny:qwen2")


@pytest.fixture(scope="module")
def samplers(tiny):
    model, tokenizer = tiny
    return (HFGenerator(model, tokenizer, batch_size=8),
            HFGenerator(model, tokenizer, batch_size=8, sampler="generate"))


def ids_of(results):
    return [[c.token_ids for c in completions] for completions in results]


def test_the_fast_decoder_is_the_default_for_llama_and_qwen2(samplers):
    fast, reference = samplers
    assert fast.sampler == "fast" and reference.sampler == "generate"


def test_greedy_ids_are_model_generates_ids(samplers):
    fast, reference = samplers
    prompts = [chat.build_prompt(fast.tokenizer, "default", u) for u in USERS]
    assert len({len(p) for p in prompts}) == len(prompts), "prompts of different lengths exercise the padding"
    greedy = SamplingParams(temperature=0, max_new_tokens=40)
    assert ids_of(fast.generate(prompts, greedy)) == ids_of(reference.generate(prompts, greedy))


def test_greedy_ids_through_a_soft_prefix_are_model_generates_ids(samplers):
    fast, reference = samplers
    prompts = [chat.build_prompt(fast.tokenizer, "soft(3)", u) for u in USERS]
    soft = torch.randn(len(USERS), 3, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    assert ids_of(fast.generate(prompts, greedy, prompt_embeds=soft)) == ids_of(
        reference.generate(prompts, greedy, prompt_embeds=soft))


def test_greedy_ids_with_an_active_lora_adapter_are_model_generates_ids(tiny):
    from peft import LoraConfig, get_peft_model

    _, tokenizer = tiny
    torch.manual_seed(0)
    peft_model = get_peft_model(models.load_model("tiny:qwen2", device="cpu"),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    inner = peft_model.get_base_model()  # the teacher's setting: LoRA layers injected, active
    prompts = [chat.build_prompt(tokenizer, "default", u) for u in USERS]
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    fast = ids_of(HFGenerator(inner, tokenizer).generate(prompts, greedy))
    assert fast == ids_of(HFGenerator(inner, tokenizer, sampler="generate").generate(prompts, greedy))
    with peft_model.disable_adapter():
        assert ids_of(HFGenerator(inner, tokenizer).generate(prompts, greedy)) != fast


def test_sampled_first_and_second_tokens_have_model_generates_distribution(tiny):
    """The fast sampler's first token against the exact next-token probabilities of a plain forward; its first two
    tokens against model.generate's draws (two-sample tests)."""
    model, tokenizer = tiny
    fast, reference = (HFGenerator(model, tokenizer, batch_size=1500, sampler=s) for s in ("fast", "generate"))
    prompt = chat.build_prompt(tokenizer, "none", "Sea?")  # short: 3000 rows of prefill
    params = SamplingParams(n=3000, temperature=0.5, max_new_tokens=2, seed=4)  # T<1: a peaked target, more power

    def drawn(generator) -> list[list[int]]:  # the sampled ids, the stop token included
        return [c.token_ids + ([c.stop_token_id] if c.finish_reason == "stop" else [])
                for c in generator.generate([prompt], params)[0]]

    fast_ids, ref_ids = drawn(fast), drawn(reference)
    fast_draws = torch.tensor([ids[:2] for ids in fast_ids if len(ids) == 2])
    ref_draws = torch.tensor([ids[:2] for ids in ref_ids if len(ids) == 2])
    vocab = model.config.vocab_size
    with torch.no_grad():
        exact = torch.softmax(model(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1] / 0.5, dim=-1)
    first_fast = torch.bincount(torch.tensor([ids[0] for ids in fast_ids]), minlength=vocab)
    assert goodness_of_fit(first_fast, exact) > P_MIN
    first_ref = torch.bincount(torch.tensor([ids[0] for ids in ref_ids]), minlength=vocab)
    assert two_sample(first_fast, first_ref) > P_MIN
    second = [torch.bincount(d[:, 1], minlength=vocab) for d in (fast_draws, ref_draws)]
    assert two_sample(*second) > P_MIN


def test_rows_leave_the_batch_without_changing_what_the_others_decode(tiny):
    model, tokenizer = tiny
    prompts = [chat.build_prompt(tokenizer, "default", u) for u in USERS * 3]
    batch = chat.build_batch(prompts, pad_id=chat.soft_placeholder_id(tokenizer), padding_side="left")
    embeds = model.get_input_embeddings()(batch.input_ids).detach()
    budgets = torch.tensor([3, 20, 7, 20, 1, 12, 20, 5, 9, 20, 2, 16])
    settings = DecodeSettings(max_new_tokens=20, temperature=0.0)
    compacting = FastDecoder([], compact_below=1.0)  # compact whenever a row has finished
    with torch.inference_mode():
        kept_in = FastDecoder([], compact_below=0.0).generate(model, embeds, batch.attention_mask, settings,
                                                              row_budgets=budgets)
        compacted = compacting.generate(model, embeds, batch.attention_mask, settings, row_budgets=budgets)
    assert compacting.stats.compactions > 0
    assert compacted == kept_in
    assert [len(ids) for ids in compacted] == budgets.tolist()


def test_other_architectures_fall_back_to_model_generate(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = tiny
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16)).eval()
    assert "gpt2" in unsupported_reason(gpt2)
    generator = HFGenerator(gpt2, tokenizer)
    assert generator.sampler == "generate"
    (completions,) = generator.generate([chat.build_prompt(tokenizer, "default", "Hi")],
                                        SamplingParams(temperature=0, max_new_tokens=3))
    assert len(completions[0].token_ids) <= 3


def test_a_prompts_completions_share_one_prefill_and_draw_what_separate_prefills_draw(tiny):
    """n completions of each prompt: the prompt is prefilled once and its cache copied to its rows; the draws at
    T=1 from one seed are the ones the decoder draws when every row is prefilled on its own."""
    model, tokenizer = tiny
    prompts = [chat.build_prompt(tokenizer, "default", u) for u in USERS]
    rows = [p for p in prompts for _ in range(5)]  # HFGenerator's layout: a prompt's copies side by side
    batch = chat.build_batch(rows, pad_id=chat.soft_placeholder_id(tokenizer), padding_side="left")
    embeds = model.get_input_embeddings()(batch.input_ids).detach()
    settings = DecodeSettings(max_new_tokens=16, temperature=1.0)
    shared, separate = FastDecoder([]), FastDecoder([], share_prefill=False)
    with torch.inference_mode():
        drawn = [decoder.generate(model, embeds, batch.attention_mask, settings, torch.Generator().manual_seed(7))
                 for decoder in (shared, separate)]
    assert shared.stats.prefill_rows == len(USERS) and separate.stats.prefill_rows == len(rows)
    assert drawn[0] == drawn[1]
    assert len({tuple(ids) for ids in drawn[0][:5]}) > 1, "a prompt's rows draw apart after the shared prefill"


def test_rows_that_differ_are_each_prefilled():
    from shared.lm.decoding import repeated_rows

    embeds = torch.tensor([[[1.0]], [[1.0]], [[2.0]], [[1.0]], [[1.0]]])
    mask = torch.ones(5, 1, dtype=torch.bool)
    firsts, owner = repeated_rows(embeds, mask)
    assert firsts.tolist() == [0, 2, 3] and owner.tolist() == [0, 0, 1, 2, 2]
    mask[1, 0] = False  # same embeddings, other padding: not the same prompt
    assert repeated_rows(embeds, mask)[0].tolist() == [0, 1, 2, 3]
    assert repeated_rows(embeds[[0, 2]], mask[[0, 2]]) == (None, None)
