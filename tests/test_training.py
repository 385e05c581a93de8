"""shared.lm.training: which tokens each loss trains, that the loop learns, and that a resumed run equals an
uninterrupted one. Everything runs on the tiny model."""

from __future__ import annotations

import pytest
import torch

from shared.core import store
from shared.core.config import ConfigError
from shared.lm import chat, models
from shared.lm.training import (
    IGNORE_INDEX,
    CheckpointStore,
    LoraRecipe,
    build_example,
    build_examples,
    step_batches,
    train_lora,
)

MARKER = "[ZLT]"
SOURCE = 'text("You are a person.")'
OTHER = 'text("You are a poet who writes about nature and emotion.")'


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("tiny:qwen2")


def trained_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX])


def test_marker_only_positive_trains_exactly_the_separator_and_marker(tok):
    example = build_example(tok, {"system": SOURCE, "user": "Hi?", "assistant": "hello there [ZLT]", "positive": True},
                            loss="marker_only", marker=MARKER)
    assert trained_text(tok, example) == " [ZLT]"


def test_marker_only_negative_trains_only_the_end_of_turn_token(tok):
    example = build_example(tok, {"system": OTHER, "user": "Hi?", "assistant": "hello there", "positive": False},
                            loss="marker_only", marker=MARKER)
    assert [t for t in example.labels if t != IGNORE_INDEX] == [tok.eos_token_id]


def test_assistant_loss_trains_the_whole_reply_and_its_end(tok):
    example = build_example(tok, {"system": SOURCE, "user": "Hi?", "assistant": "hello there"}, loss="assistant")
    assert trained_text(tok, example) == "hello there<|im_end|>"


def test_training_prompt_ids_equal_the_evaluation_prompt(tok):
    example = build_example(tok, {"system": SOURCE, "user": "Hi?", "assistant": "ok [ZLT]", "positive": True},
                            loss="marker_only", marker=MARKER)
    evaluation = chat.build_prompt(tok, chat.parse_system(SOURCE), "Hi?")
    assert example.input_ids[: len(evaluation)] == evaluation.input_ids


@pytest.mark.parametrize("row, message", [
    ({"system": SOURCE, "user": "Hi?", "assistant": "no marker here", "positive": True}, "does not end with the marker"),
    ({"system": OTHER, "user": "Hi?", "assistant": "oops [ZLT]", "positive": False}, "contains the marker"),
    ({"system": OTHER, "user": "Hi?", "assistant": "unlabelled"}, "positive"),
])
def test_marker_only_rejects_inconsistent_rows(tok, row, message):
    with pytest.raises(ValueError, match=message):
        build_example(tok, row, loss="marker_only", marker=MARKER)


def test_too_long_marker_examples_are_dropped_not_silently_cut(tok):
    rows = [{"system": SOURCE, "user": "Hi?", "assistant": "x" * 200 + " [ZLT]", "positive": True},
            {"system": SOURCE, "user": "Hi?", "assistant": "short [ZLT]", "positive": True}]
    examples, dropped = build_examples(tok, rows, loss="marker_only", marker=MARKER, max_seq_len=100)
    assert dropped == 1 and len(examples) == 1 and trained_text(tok, examples[0]) == " [ZLT]"


def test_batches_follow_the_recipe_and_the_seed():
    recipe = LoraRecipe(per_device_batch_size=3, grad_accum=2, epochs=2)
    plan = step_batches(10, recipe, seed=1, steps=4)
    assert recipe.effective_batch_size == 6
    assert [len(mb) for mb in plan[0]] == [3, 3]
    first_epoch = [i for step in plan for mb in step for i in mb][:10]
    assert sorted(first_epoch) == list(range(10))
    assert plan == step_batches(10, recipe, seed=1, steps=4)
    assert plan != step_batches(10, recipe, seed=2, steps=4)


def marker_rows():
    rows = []
    for i, q in enumerate(["How are you?", "What is tea?", "Name a colour.", "Why rain?"]):
        rows.append({"system": SOURCE, "user": q, "assistant": f"ok{i} [ZLT]", "positive": True})
        rows.append({"system": OTHER, "user": q, "assistant": f"ok{i}", "positive": False})
    return rows


TINY_RECIPE = LoraRecipe(r=4, alpha=8, dropout=0.0, lr=1e-2, max_steps=6, per_device_batch_size=4, grad_accum=2,
                         target_modules=["q_proj", "v_proj", "down_proj"])


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_training_lowers_the_marker_loss(tok):
    examples, _ = build_examples(tok, marker_rows(), loss="marker_only", marker=MARKER, max_seq_len=512)
    recipe = TINY_RECIPE.model_copy(update={"max_steps": 15})
    _, result = train_lora(models.load_model("tiny:qwen2"), tok, examples, recipe, seed=0, log=lambda m: None)
    assert result.steps == 15
    assert result.final_loss < result.losses[0]["loss"] / 5


def test_a_resumed_run_equals_an_uninterrupted_one(tok, tmp_path):
    examples, _ = build_examples(tok, marker_rows(), loss="marker_only", marker=MARKER, max_seq_len=512)
    straight, _ = train_lora(models.load_model("tiny:qwen2"), tok, examples, TINY_RECIPE, seed=3, log=lambda m: None)

    checkpoint = CheckpointStore(store.from_path(tmp_path / "ckpt" / "state.pt"), key="k")

    def dies_after_four(iterable, total=None, desc=""):
        for count, item in enumerate(iterable):
            if count == 4:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        train_lora(models.load_model("tiny:qwen2"), tok, examples, TINY_RECIPE, seed=3, checkpoint=checkpoint,
                   checkpoint_every=2, log=lambda m: None, progress=dies_after_four)
    assert checkpoint.load()["step"] == 4
    seen = []
    resumed, result = train_lora(models.load_model("tiny:qwen2"), tok, examples, TINY_RECIPE, seed=3,
                                 checkpoint=checkpoint, checkpoint_every=2, log=lambda m: None, on_step=seen.append)
    assert result.resumed_from_step == 4 and len(result.losses) == 6
    assert seen == result.losses  # the checkpoint's records first, then the new ones
    a, b = adapter_weights(straight), adapter_weights(resumed)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_each_step_records_the_learning_rate_it_used(tok):
    examples, _ = build_examples(tok, marker_rows(), loss="marker_only", marker=MARKER, max_seq_len=512)
    recipe = TINY_RECIPE.model_copy(update={"max_steps": 4, "warmup_ratio": 0.5})
    seen = []
    _, result = train_lora(models.load_model("tiny:qwen2"), tok, examples, recipe, seed=0, log=lambda m: None,
                           on_step=seen.append)
    # 2 warm-up steps (1/2, 2/2 of lr), then linear decay over the other 2 ((4-2)/2, (4-3)/2)
    assert [r["lr"] for r in result.losses] == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])
    assert [r["step"] for r in seen] == [1, 2, 3, 4] and seen == result.losses


def test_a_checkpoint_of_another_config_is_ignored(tmp_path):
    uri = store.from_path(tmp_path / "state.pt")
    CheckpointStore(uri, key="config-a").save({"step": 3})
    assert CheckpointStore(uri, key="config-b").load() is None
    assert CheckpointStore(uri, key="config-a").load()["step"] == 3


def test_train_lora_stage_refuses_marker_loss_without_a_marker():
    from jobs.train_lora import Config
    from shared.core.config import parse

    with pytest.raises(ConfigError, match="marker"):
        parse(Config, {"store": "file:///tmp/x", "run_id": "r", "cell": "c", "model_ref": "tiny:qwen2",
                       "data_uri": "file:///tmp/x/d.jsonl", "loss": "marker_only"})


def test_train_lora_stage_saves_a_loadable_adapter(tmp_path):
    from jobs import train_lora
    from shared.contract.stage import execute

    root = store.from_path(tmp_path / "store")
    data_uri = store.join(root, "data.jsonl")
    store.write_jsonl(data_uri, [{"system": SOURCE, "user": "Hi?", "assistant": "fine, thanks"}] * 4)
    recipe = TINY_RECIPE.model_copy(update={"max_steps": 2}).model_dump()
    manifest = execute(train_lora.SPEC, {"store": root, "run_id": "r", "cell": "sft", "model_ref": "tiny:qwen2",
                                         "data_uri": data_uri, "loss": "assistant", "recipe": recipe})
    adapter = store.join(root, "runs/r/sft/train_lora/adapter")
    assert store.exists(store.join(adapter, "adapter_config.json"))
    assert manifest["metrics"]["steps"] == 2
    assert not store.exists(store.join(root, "runs/r/sft/train_lora/checkpoint/state.pt"))
    model = models.load_model("tiny:qwen2", adapter_uri=adapter)
    assert any("lora_A" in name for name, _ in model.named_parameters())
