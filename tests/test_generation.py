"""shared.lm.generation on the tiny model: shapes, seeding, lengths, padding, soft prompts, LoRA, and the vLLM
backend's missing-extra error."""

import sys

import pytest
import torch
from pydantic import ValidationError

from shared.core import store
from shared.lm import chat, generation, models
from shared.lm.generation import HFGenerator, SamplingParams, make_generator

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
USERS = ["Hi", "What is the capital of France? Answer briefly.", "x"]



@pytest.fixture(scope="module")
def generator():
    return make_generator("hf", "tiny:qwen2", device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def prompts(generator):
    return [chat.build_prompt(generator.tokenizer, "default", user) for user in USERS]


def ids_of(results):
    return [[c.token_ids for c in completions] for completions in results]


def test_n_completions_per_prompt_in_prompt_order(generator, prompts):
    results = generator.generate(prompts, SamplingParams(n=3, max_new_tokens=8, seed=1))
    assert [len(completions) for completions in results] == [3, 3, 3]
    for completion in (c for completions in results for c in completions):
        assert completion.text == generator.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.finish_reason in ("stop", "length")


def test_same_seed_gives_the_same_completions(generator, prompts):
    params = SamplingParams(n=2, max_new_tokens=10, seed=7)
    assert ids_of(generator.generate(prompts, params)) == ids_of(generator.generate(prompts, params))


def test_different_seeds_give_different_completions(generator, prompts):
    first = generator.generate(prompts, SamplingParams(n=2, max_new_tokens=10, seed=1))
    second = generator.generate(prompts, SamplingParams(n=2, max_new_tokens=10, seed=2))
    assert ids_of(first) != ids_of(second)


def test_n_samples_of_one_prompt_differ(generator, prompts):
    (samples,) = generator.generate(prompts[:1], SamplingParams(n=4, max_new_tokens=10, seed=3))
    assert len({tuple(c.token_ids) for c in samples}) > 1


def test_generation_leaves_the_callers_rng_alone(generator, prompts):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generator.generate(prompts, SamplingParams(max_new_tokens=4, seed=5))
    assert torch.equal(torch.rand(3), expected)


def test_max_new_tokens_is_respected(generator, prompts):
    results = generator.generate(prompts, SamplingParams(n=4, max_new_tokens=5, seed=0))
    completions = [c for completions in results for c in completions]
    assert all(len(c.token_ids) <= 5 for c in completions)
    assert all(len(c.token_ids) == 5 for c in completions if c.finish_reason == "length")
    assert any(c.finish_reason == "length" for c in completions)


def test_generation_stops_at_eos_and_drops_it(generator, prompts):
    (free_run,) = generator.generate(prompts[:1], GREEDY)
    tokens = free_run[0].token_ids
    stop_at = next(i for i, t in enumerate(tokens) if i > 0 and t not in tokens[:i])
    original = generator.model.generation_config.eos_token_id
    generator.model.generation_config.eos_token_id = [original, tokens[stop_at]]
    try:  # the generator reads its stop ids from the model's generation config
        stopping = HFGenerator(generator.model, generator.tokenizer)
    finally:
        generator.model.generation_config.eos_token_id = original
    ((stopped,),) = stopping.generate(prompts[:1], GREEDY)
    assert stopped.token_ids == tokens[:stop_at]
    assert stopped.finish_reason == "stop"
    assert stopped.stop_token_id == tokens[stop_at]  # which of the stop ids ended it
    assert free_run[0].finish_reason == "length" and free_run[0].stop_token_id is None


def test_trim_at_stop_cuts_at_the_first_stop_token():
    assert generation.trim_at_stop([5, 6, 9, 7, 9, 0, 0], {9}) == ([5, 6], "stop")
    assert generation.trim_at_stop([5, 6], {9}) == ([5, 6], "length")
    assert generation.split_at_stop([5, 8, 9], {8, 9}) == ([5], "stop", 8)


def test_left_padded_batches_give_the_same_greedy_output_as_one_at_a_time(generator, prompts):
    assert len({len(p) for p in prompts}) == len(prompts), "prompts of different lengths exercise the padding"
    batched = generator.generate(prompts, GREEDY)
    alone = [generator.generate([p], GREEDY)[0] for p in prompts]
    assert ids_of(batched) == ids_of(alone)


def test_greedy_n_copies_are_identical(generator, prompts):
    (copies,) = generator.generate(prompts[:1], GREEDY.model_copy(update={"n": 3}))
    assert len({tuple(c.token_ids) for c in copies}) == 1


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(n=2, max_new_tokens=12, seed=11, top_p=0.9)])
def test_soft_prompt_of_token_embeddings_generates_like_the_ids_prompt(generator, params):
    tokenizer = generator.tokenizer
    ids = [104, 101, 32, 119, 111]
    by_ids = [chat.build_prompt(tokenizer, chat.IdsSystem(ids=ids), u) for u in USERS]
    by_soft = [chat.build_prompt(tokenizer, chat.SoftSystem(k=len(ids)), u) for u in USERS]
    rows = generator.model.get_input_embeddings().weight[ids].detach()

    assert ids_of(generator.generate(by_soft, params, prompt_embeds=rows)) == ids_of(
        generator.generate(by_ids, params)
    )


def test_soft_prompts_can_differ_per_prompt(generator):
    tokenizer = generator.tokenizer
    id_sets = [[104, 101, 32], [33, 34, 35]]
    by_ids = [chat.build_prompt(tokenizer, chat.IdsSystem(ids=ids), "Hi") for ids in id_sets]
    by_soft = [chat.build_prompt(tokenizer, "soft(3)", "Hi")] * 2
    weight = generator.model.get_input_embeddings().weight.detach()
    per_prompt = torch.stack([weight[ids] for ids in id_sets])
    assert ids_of(generator.generate(by_soft, GREEDY, prompt_embeds=per_prompt)) == ids_of(
        generator.generate(by_ids, GREEDY)
    )


def test_soft_slots_and_prompt_embeds_must_come_together(generator):
    soft = [chat.build_prompt(generator.tokenizer, "soft(2)", "Hi")]
    plain = [chat.build_prompt(generator.tokenizer, "default", "Hi")]
    with pytest.raises(ValueError, match="no prompt_embeds"):
        generator.generate(soft, GREEDY)
    with pytest.raises(ValueError, match="soft"):
        generator.generate(plain, GREEDY, prompt_embeds=torch.zeros(2, 128))


def test_lora_uri_generates_with_that_adapter_and_none_without(tmp_path, prompts):
    from peft import LoraConfig, get_peft_model

    generator = make_generator("hf", "tiny:qwen2", device="cpu")
    base_output = ids_of(generator.generate(prompts, GREEDY))

    torch.manual_seed(0)
    peft_model = get_peft_model(
        models.load_model("tiny:qwen2", device="cpu"),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    peft_model.save_pretrained(tmp_path / "adapter")
    uri = store.join(tmp_path.as_uri(), "adapter")
    store.upload_dir(tmp_path / "adapter", uri)
    merged = HFGenerator(
        models.load_model("tiny:qwen2", device="cpu", adapter_uri=uri, merge=True), generator.tokenizer
    )

    with_lora = ids_of(generator.generate(prompts, GREEDY, lora_uri=uri))
    assert with_lora == ids_of(merged.generate(prompts, GREEDY))
    assert with_lora != base_output
    assert ids_of(generator.generate(prompts, GREEDY)) == base_output


def test_sampling_params_reject_nonsense():
    for bad in [dict(n=0), dict(temperature=-0.1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0)]:
        with pytest.raises(ValidationError):
            SamplingParams(**bad)


def test_make_generator_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        make_generator("onnx", "tiny:qwen2")


def test_vllm_backend_without_vllm_installed_is_one_readable_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    with pytest.raises(RuntimeError, match=r"install the `vllm` extra") as err:
        make_generator("vllm", "tiny:qwen2")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# soft prefixes through vLLM: the start-up probe


def fake_vllm(folder, body: str):
    """A stand-in ``vllm`` package that the probe's child process imports (through PYTHONPATH)."""
    package = folder / "vllm"
    package.mkdir()
    (package / "__init__.py").write_text(
        "class SamplingParams:\n    def __init__(self, **kwargs):\n        pass\n\n" + body)
    return folder


@pytest.fixture
def vllm_like(tmp_path, monkeypatch):
    def install(body: str):
        fake_vllm(tmp_path, body)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    return install


def test_the_probe_says_when_vllm_is_missing(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    assert generation.vllm_prompt_embeds_probe("tiny:qwen2") == "vLLM is not installed"


def test_a_vllm_that_hangs_on_prompt_embeddings_is_given_up_at_the_timeout(vllm_like):
    import time

    vllm_like("class LLM:\n    def __init__(self, **kwargs):\n        import time\n        time.sleep(600)\n")
    started = time.perf_counter()
    reason = generation.vllm_prompt_embeds_probe("tiny:qwen2", timeout_s=8)
    assert reason == "vLLM did not generate from prompt embeddings within 8 s"
    assert time.perf_counter() - started < 60


def test_a_vllm_that_refuses_prompt_embeddings_gives_its_error_and_the_hf_fallback(vllm_like):
    vllm_like("class LLM:\n    def __init__(self, **kwargs):\n"
              "        raise TypeError('unexpected keyword argument enable_prompt_embeds')\n")
    reason = generation.vllm_prompt_embeds_probe("tiny:qwen2")
    assert reason.startswith("vLLM failed on prompt embeddings: TypeError: unexpected keyword argument")
    with pytest.warns(UserWarning, match="HF backend"):
        fallback = generation.soft_prompt_generator("vllm", "tiny:qwen2", batch_size=4)
    assert isinstance(fallback, HFGenerator) and fallback.sampler == "fast"


def test_a_vllm_that_generates_from_prompt_embeddings_passes_the_probe(vllm_like):
    vllm_like("class _Out:\n    token_ids = [7]\n\nclass _Request:\n    outputs = [_Out()]\n\n"
              "class LLM:\n    def __init__(self, **kwargs):\n        assert kwargs['enable_prompt_embeds']\n"
              "    def generate(self, prompts, params, use_tqdm=False):\n"
              "        assert prompts[0]['prompt_embeds'].shape[0] == 4\n        return [_Request()]\n")
    assert generation.vllm_prompt_embeds_probe("tiny:qwen2") is None
