"""shared.activations: the one layer convention (layer L = hidden_states[L], the residual stream after L blocks, no
final norm), pinned against the installed transformers, and the three activation-reading stages (issue81's
hidden_states, issue170's villain_direction, issue205's extract_persona_vectors) reading identical vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs import extract_persona_vectors, hidden_states, villain_direction
from shared import activations, chat, models

QUESTIONS = ["Hi", "What do you enjoy most about your work, and why?"]
SYSTEM = "text(You are a villainous mastermind.)"


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny:qwen2", device="cpu"), models.load_tokenizer("tiny:qwen2")


def hf_hidden_states(model, ids: list[int]) -> tuple:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


def block_output(model, block: int, ids: list[int]) -> torch.Tensor:
    captured = {}
    hook = model.model.layers[block].register_forward_hook(
        lambda _m, _i, out: captured.update(out=out[0] if isinstance(out, tuple) else out))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        hook.remove()
    return captured["out"][0]


def test_layers_below_the_last_are_transformers_own_hidden_states_index(tiny):
    model, tok = tiny
    prompts = [chat.build_prompt(tok, SYSTEM, q) for q in QUESTIONS]
    batch = chat.build_batch(prompts, pad_id=0, padding_side="left")  # padding is exercised: the lengths differ
    n = activations.n_layers(model)
    ours = activations.residual_stream(model, list(range(n + 1)), input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    with torch.inference_mode():
        theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True).hidden_states
    assert len(theirs) == n + 1 and set(ours) == set(range(n + 1))
    for layer in range(n):
        torch.testing.assert_close(ours[layer], theirs[layer])
    embeddings = model.get_input_embeddings()(batch.input_ids)
    torch.testing.assert_close(ours[0], embeddings)  # layer 0 is the token embeddings


def test_the_last_layer_is_the_last_blocks_output_and_transformers_normalises_its_own_last_entry(tiny):
    """What the installed transformers does (and why this module does not use its last entry): its
    hidden_states[n_layers] is the final RMSNorm of the last block's output, not the block's output."""
    model, tok = tiny
    ids = chat.build_prompt(tok, SYSTEM, QUESTIONS[1]).input_ids
    n = activations.n_layers(model)
    ours = activations.residual_stream(model, [n], input_ids=torch.tensor([ids]))[n][0]
    torch.testing.assert_close(ours, block_output(model, n - 1, ids))
    theirs = hf_hidden_states(model, ids)[n][0]
    with torch.inference_mode():
        torch.testing.assert_close(theirs, model.model.norm(ours))
    assert not torch.allclose(theirs, ours, atol=1e-3)


def test_the_pass_stops_after_the_deepest_requested_layer(tiny):
    model, tok = tiny
    calls = []
    hook = model.model.layers[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        activations.residual_stream(model, [1, 0], input_ids=torch.tensor([chat.build_prompt(tok, SYSTEM, "Hi").input_ids]))
        assert not calls  # layer 1 is block 0's output: block 1 never ran
        activations.residual_stream(model, [2], input_ids=torch.tensor([chat.build_prompt(tok, SYSTEM, "Hi").input_ids]))
        assert calls == [1]
    finally:
        hook.remove()


def test_layers_the_model_lacks_are_named_and_the_artifacts_record_the_convention(tiny):
    model, tok = tiny
    assert activations.missing_layers([0, 2, 3, -1], n_blocks=2) == [3, -1]
    with pytest.raises(ValueError, match=r"layers \[3\] do not exist: the model has layers 0..2"):
        activations.residual_stream(model, [3], input_ids=torch.tensor([[1, 2, 3]]))
    record = activations.layer_record([1, 2])
    assert record == {"layer_convention": activations.LAYER_CONVENTION, "layers": [1, 2]}
    assert "hidden_states[L]" in record["layer_convention"] and "no final norm" in record["layer_convention"]


def test_an_attached_adapter_is_read_through_and_switches_off_with_it(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    base = activations.residual_stream(model, [2], input_ids=torch.tensor([chat.build_prompt(tok, SYSTEM, "Hi").input_ids]))[2]
    lora = get_peft_model(models.load_model("tiny:qwen2", device="cpu"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.tensor([chat.build_prompt(tok, SYSTEM, "Hi").input_ids])
    adapted = activations.residual_stream(lora, [2], input_ids=ids)[2]
    with lora.disable_adapter():
        switched_off = activations.residual_stream(lora, [2], input_ids=ids)[2]
    assert not torch.allclose(adapted, base, atol=1e-4)
    torch.testing.assert_close(switched_off, base)


def three_stage_vectors(model, tok, layers: list[int]) -> dict[str, np.ndarray]:
    """Each stage's vectors ``[prompts, layers, hidden]`` at the last user token of the same prompts.

    villain_direction reads the last user token of the whole prompt; hidden_states and Method A read the last token
    they are given, so they get the same prompts cut right after that token. In a causal model the residual at a
    position depends only on the tokens up to it, so the three read the same thing, with each stage's own batching
    and padding (left, none, right)."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    full = [chat.build_prompt(tok, SYSTEM, q) for q in QUESTIONS]
    ends = [villain_direction.last_user_token(p, im_end) for p in full]
    cut = [chat.PromptIds(p.input_ids[: end + 1], end + 1) for p, end in zip(full, ends, strict=True)]
    assert len({len(p) for p in cut}) > 1  # the batched stages really pad
    return {
        "hidden_states": hidden_states.last_token_states(model, tok, cut, layers, batch_size=2).numpy(),
        "villain_direction": villain_direction.residuals(model, tok, full, layers),
        "extract_persona_vectors": torch.stack(extract_persona_vectors.method_a(
            model, cut, layers, pad_id=chat.soft_placeholder_id(tok), batch_size=2, progress=lambda x, **_: x)).numpy(),
    }  # fmt: skip


def test_all_three_stages_read_identical_vectors_for_one_prompt_position_and_layer(tiny):
    model, tok = tiny
    vectors = three_stage_vectors(model, tok, [0, 1, 2])
    reference = vectors["villain_direction"]
    assert reference.shape == (2, 3, 128)
    for stage, got in vectors.items():
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4, err_msg=stage)  # float32 batching noise
    assert not np.allclose(reference[:, 1], reference[:, 2])  # the layers are really different vectors


def test_all_three_stages_agree_on_the_real_small_model_at_its_first_middle_and_last_layer():
    """SmolLM2-135M (30 blocks): layer 15 is transformers' hidden_states[15]; layer 30 is the last block's output, whose
    final-normed version is transformers' hidden_states[30]. In float32, where batching changes only the last bits
    (in bf16, differently padded batches differ by whole rounding steps)."""
    model = models.load_model("smollm2:135m-instruct", dtype="float32", device="cpu")
    tok = models.load_tokenizer("smollm2:135m-instruct")
    vectors = three_stage_vectors(model, tok, [0, 15, 30])
    for stage, got in vectors.items():
        np.testing.assert_allclose(got, vectors["villain_direction"], rtol=1e-4, atol=1e-3, err_msg=stage)
    ids = chat.build_prompt(tok, SYSTEM, QUESTIONS[0]).input_ids
    theirs = hf_hidden_states(model, ids)
    ours = activations.residual_stream(model, [15, 30], input_ids=torch.tensor([ids]))
    torch.testing.assert_close(ours[15], theirs[15])
    with torch.inference_mode():
        torch.testing.assert_close(theirs[30], model.model.norm(ours[30]))
