"""Stage extract_persona_vectors on the tiny model: Method A is the last prompt token, Method B the mean over the
generated reply ids, batching changes nothing, empty replies are marked, adapters are merged, bad layers fail."""

from __future__ import annotations

import pytest
import torch

from jobs import extract_persona_vectors as extract
from shared.contract.stage import execute, run_stage
from shared.core import store
from shared.lm import activations, chat, models

PERSONAS = [
    {"name": "assistant", "system": "text(You are a helpful assistant.)"},
    {"name": "villain", "system": "text(You are a villainous mastermind who schemes to take over the world.)"},
    {"name": "qwen-default", "system": "default"},
]
QUESTIONS = [{"id": "q0", "text": "Hi"}, {"id": "q1", "text": "What do you enjoy most about your work, and why?"}]


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny:qwen2", device="cpu"), models.load_tokenizer("tiny:qwen2")


def config(tmp_path, **overrides):
    return {
        "store": store.from_path(tmp_path / "store"), "run_id": "t", "cell": "base", "checkpoint": "base",
        "model_ref": "tiny:qwen2", "personas": PERSONAS, "questions": QUESTIONS, "layers": [1, 2],
        "max_new_tokens": 6, "batch_size": 4, **overrides,
    }  # fmt: skip


def block_outputs(model, ids: list[int]) -> dict[int, torch.Tensor]:
    """Layer L (the residual after L blocks) for one unpadded sequence: the reference the stage must match. Layer
    L >= 1 is decoder block L-1's output, hooked here independently of the stage's own reading."""
    captured = {}
    hooks = [block.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(i + 1, out[0] if isinstance(out, tuple) else out))
             for i, block in enumerate(model.model.layers)]  # fmt: skip
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return {i: t[0].float() for i, t in captured.items()}


def test_method_a_is_the_last_prompt_token_and_batching_changes_nothing(tiny):
    model, tok = tiny
    prompts = [chat.build_prompt(tok, p["system"], q["text"]) for p in PERSONAS for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # padding is really exercised
    batched = extract.method_a(model, prompts, [1, 2], pad_id=0, batch_size=6, progress=lambda x, **_: x)
    for prompt, vectors in zip(prompts, batched, strict=True):
        reference = block_outputs(model, prompt.input_ids)
        for row, layer in enumerate([1, 2]):
            torch.testing.assert_close(vectors[row], reference[layer][-1], rtol=1e-4, atol=1e-5)


def test_layers_are_hidden_states_indices_zero_the_embeddings(tiny):
    model, tok = tiny
    prompt = chat.build_prompt(tok, "default", "Hi")
    (vectors,) = extract.method_a(model, [prompt], [0, 1], pad_id=0, batch_size=1, progress=lambda x, **_: x)
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([prompt.input_ids]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(vectors[0], hidden[0][0, -1].float(), rtol=1e-4, atol=1e-5)  # the embeddings
    torch.testing.assert_close(vectors[1], hidden[1][0, -1].float(), rtol=1e-4, atol=1e-5)  # after block 0


def test_method_b_averages_the_reply_ids_and_marks_empty_replies(tiny):
    model, tok = tiny
    prompts = [chat.build_prompt(tok, p["system"], "Hi") for p in PERSONAS]
    replies = [[72, 105, 33], [], [260, 32, 101, 102, 103]]
    vectors = extract.method_b(model, prompts, replies, [2], pad_id=0, batch_size=8, progress=lambda x, **_: x)
    assert vectors[1] is None
    for index in (0, 2):
        reference = block_outputs(model, prompts[index].input_ids + replies[index])[2]
        start = len(prompts[index])
        torch.testing.assert_close(vectors[index][0], reference[start:].mean(dim=0), rtol=1e-4, atol=1e-5)


def test_stage_stores_per_question_activations_with_their_axes(tmp_path):
    manifest = execute(extract.SPEC, config(tmp_path))
    prefix = store.join(store.from_path(tmp_path / "store"), "runs", "t", "base", "extract_persona_vectors")
    tensors = store.read_tensors(store.join(prefix, "activations.safetensors"))
    index = store.read_json(store.join(prefix, "index.json"))
    assert tensors["A"].shape == (3, 2, 2, 128) and tensors["B"].shape == (3, 2, 2, 128)
    assert tensors["B_valid"].shape == (3, 2) and tensors["B_valid"].dtype == torch.bool
    assert [p["name"] for p in index["personas"]] == ["assistant", "villain", "qwen-default"]
    assert index["questions"] == ["q0", "q1"] and index["layers"] == [1, 2]
    assert index["layer_convention"] == activations.LAYER_CONVENTION
    # personas differ only in the system slot, so their Method A vectors must differ
    assert not torch.allclose(tensors["A"][0], tensors["A"][1])
    tok = models.load_tokenizer("tiny:qwen2")
    assert index["prompt_ids"]["qwen-default/q1"] == chat.build_prompt(tok, "default", QUESTIONS[1]["text"]).input_ids
    responses = store.read_jsonl(store.join(prefix, "responses.jsonl"))
    assert len(responses) == 6 and all(len(r["token_ids"]) <= 6 for r in responses)
    assert manifest["metrics"]["n_personas"] == 3


def test_an_adapter_is_merged_before_extraction(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = models.load_model("tiny:qwen2", device="cpu")
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path / "adapter"
    lora.save_pretrained(folder)
    adapter_uri = store.from_path(folder)
    execute(extract.SPEC, config(tmp_path, methods=["A"]))
    execute(extract.SPEC, config(tmp_path, methods=["A"], cell="e0", checkpoint="E0", adapter_uri=adapter_uri))
    root = store.join(store.from_path(tmp_path / "store"), "runs", "t")
    plain = store.read_tensors(store.join(root, "base", "extract_persona_vectors", "activations.safetensors"))
    adapted = store.read_tensors(store.join(root, "e0", "extract_persona_vectors", "activations.safetensors"))
    assert "B" not in plain and not torch.allclose(plain["A"], adapted["A"])


def test_a_layer_the_model_lacks_is_one_readable_line(tmp_path, capsys):
    import json

    code = run_stage(extract.SPEC, ["--config", json.dumps(config(tmp_path, layers=[0, 2, 3]))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == "error: extract_persona_vectors: layers [3] do not exist: tiny:qwen2 has layers 0..2 (hidden_states indices)"


def test_a_bad_persona_system_slot_fails_at_config_time(tmp_path):
    from shared.core.config import ConfigError

    bad = [{"name": "x", "system": "txt(hello)"}, PERSONAS[0]]
    with pytest.raises(ConfigError, match="system"):
        execute(extract.SPEC, config(tmp_path, personas=bad))
