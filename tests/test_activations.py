"""shared.lm.activations: the one layer convention (layer L = hidden_states[L], the residual stream after L blocks, no
final norm), pinned against the installed transformers; the one rule that translates the records' layer numbers; and
each activation-reading stage (issue81's hidden_states, issue170's villain_direction, issue205's
extract_persona_vectors) tested at the read-out position it uses in production."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs import extract_persona_vectors, hidden_states, villain_direction
from shared.lm import activations, chat, models

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


def reference_at(model, ids: list[int], layer: int, position: int) -> torch.Tensor:
    """The residual after ``layer`` blocks at ``position`` of one unpadded prompt, read without shared.lm.activations:
    transformers' own hidden_states below the last layer, the last block's hooked output at it."""
    if layer < activations.n_layers(model):
        return hf_hidden_states(model, ids)[layer][0, position].float()
    return block_output(model, layer - 1, ids)[position].float()


def production_readouts() -> dict[str, str]:
    """The read-out position each activation-reading stage uses in production, read from the workflows' own plans."""
    from jobs import hidden_states as hs_stage
    from workflows import issue170

    return {
        "extract_persona_vectors": "last_prompt_token",  # Method A (Method B, reply_mean: test_issue205_extraction)
        "hidden_states": hs_stage.READOUT,
        "villain_direction": issue170.Params.for_profile("full").villain_readout,
    }


def stage_vectors(model, tok, prompts, layers: list[int]) -> dict[str, np.ndarray]:
    """Each stage's own reading function, as the stage calls it (its batching and padding), on the same prompts."""
    readouts = production_readouts()
    return {
        "hidden_states": hidden_states.last_token_states(model, tok, prompts, layers, batch_size=2).numpy(),
        "villain_direction": villain_direction.residuals(model, tok, prompts, layers, readout=readouts["villain_direction"]),
        "extract_persona_vectors": torch.stack(extract_persona_vectors.method_a(
            model, prompts, layers, pad_id=chat.soft_placeholder_id(tok), batch_size=2, progress=lambda x, **_: x)).numpy(),
    }  # fmt: skip


def test_the_records_layers_translate_by_one_rule_and_every_workflow_uses_it():
    """All three records' code hooked block L's output (0-based): hidden_states[L + 1]. Each workflow's full profile
    asks for exactly those indices and reads where the record's code read (the last prompt token)."""
    from workflows import issue81, issue170, issue205

    assert [activations.from_record(layer) for layer in (7, 14, 20, 21, 27)] == [8, 15, 21, 22, 28]
    assert issue205.Params.for_profile("full").layers == [8, 15, 21, 22, 28]
    assert issue205.Params.for_profile("full").headline_layer == 21
    assert issue170.Params.for_profile("full").villain_layers == [9, 11, 13, 15]
    assert issue81.Params.for_profile("full").layers == [11, 16, 21, 26]
    assert issue81.Params.for_profile("full").headline_layer == 21
    for workflow in ("issue205", "issue170", "issue81"):
        record = activations.record_layers(workflow)
        assert record.readout == "last_prompt_token" and "register_forward_hook" in record.evidence
        table = activations.translation_markdown(workflow)
        assert all(f"| {layer} | {layer + 1} |" in table for layer in record.layers)
    with pytest.raises(ValueError, match="0-based block index"):
        activations.from_record(-1)


def test_each_stage_reads_the_position_it_uses_in_production_on_the_tiny_model(tiny):
    """Every stage, through its own function, at its production position and at every layer (0 the embeddings, 2 the
    last block's output), equals the residual read directly at that position of the unpadded prompt; the prompts
    differ in length, so the batched stages really pad."""
    model, tok = tiny
    prompts = [chat.build_prompt(tok, SYSTEM, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1
    layers = [0, 1, 2]
    readouts = production_readouts()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for stage, got in stage_vectors(model, tok, prompts, layers).items():
        for i, prompt in enumerate(prompts):
            (position,) = activations.readout_positions(prompt, readouts[stage], im_end_id=im_end)
            for li, layer in enumerate(layers):
                expected = reference_at(model, prompt.input_ids, layer, position).numpy()
                np.testing.assert_allclose(got[i, li], expected, rtol=1e-4, atol=1e-4, err_msg=f"{stage} layer {layer}")
    assert readouts["villain_direction"] == "last_prompt_token"


def test_the_named_positions_are_where_they_say():
    tok = models.load_tokenizer("tiny:qwen2")
    prompt = chat.build_prompt(tok, SYSTEM, "Hi")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert activations.readout_positions(prompt, "last_prompt_token") == [len(prompt) - 1]
    (user_end,) = activations.readout_positions(prompt, "last_user_token", im_end_id=im_end)
    assert prompt.input_ids[user_end + 1] == im_end  # the user's last token, right before the turn closes
    assert tok.decode(prompt.input_ids[: user_end + 1]).endswith("Hi")
    assert activations.readout_positions(prompt, "reply_mean", reply_length=3) == [len(prompt), len(prompt) + 1, len(prompt) + 2]
    with pytest.raises(ValueError, match="unknown read-out position"):
        activations.readout_positions(prompt, "first_token")


def test_every_stage_reads_its_production_position_on_the_real_small_model():
    """SmolLM2-135M (30 blocks), layers 0, 15 and 30 (the last block's output, whose final-normed version is
    transformers' hidden_states[30]). In float32, where batching changes only the last bits."""
    model = models.load_model("smollm2:135m-instruct", dtype="float32", device="cpu")
    tok = models.load_tokenizer("smollm2:135m-instruct")
    prompts = [chat.build_prompt(tok, SYSTEM, q) for q in QUESTIONS]
    layers = [0, 15, 30]
    for stage, got in stage_vectors(model, tok, prompts, layers).items():
        for i, prompt in enumerate(prompts):
            for li, layer in enumerate(layers):
                expected = reference_at(model, prompt.input_ids, layer, len(prompt) - 1).numpy()
                np.testing.assert_allclose(got[i, li], expected, rtol=1e-4, atol=1e-3, err_msg=f"{stage} layer {layer}")
    ids = prompts[0].input_ids
    with torch.inference_mode():
        torch.testing.assert_close(hf_hidden_states(model, ids)[30],
                                   model.model.norm(activations.residual_stream(model, [30], input_ids=torch.tensor([ids]))[30]))


def test_each_workflows_data_readme_prints_the_translation_table_of_its_record():
    from importlib import resources

    for workflow in ("issue205", "issue170", "issue81"):
        readme = resources.files("shared.data").joinpath(workflow, "README.md").read_text()
        assert activations.translation_markdown(workflow) in readme, workflow
