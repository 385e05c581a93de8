"""Stage ``train_lora``: LoRA SFT of a base model on a stored JSONL of conversations; the adapter is the output.

Rows are ``{"system", "user", "assistant"[, "positive"]}`` (see ``shared.lm.training.TrainRow``). ``loss`` picks an
ordinary assistant-token loss or #46's marker-only loss. The adapter is saved with ``save_pretrained`` under
``adapter/`` in the stage's output prefix, which ``shared.lm.models.load_model(adapter_uri=...)`` and vLLM
load. With ``checkpoint_every`` > 0 a killed run resumes from its last checkpoint instead of starting over.
"""

from __future__ import annotations

import tempfile

from pydantic import model_validator

from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.training import LoraRecipe, Loss


class Config(StageConfig):
    model_ref: str
    data_uri: str
    loss: Loss = "assistant"
    marker: str | None = None
    recipe: LoraRecipe = LoraRecipe()
    dtype: str | None = None  # None: the checkpoint's own (bf16 for Qwen2.5)
    checkpoint_every: int = 0

    @model_validator(mode="after")
    def marker_loss_needs_marker(self):
        if self.loss == "marker_only" and not self.marker:
            raise ValueError("loss 'marker_only' needs the marker text (field 'marker')")
        return self


def run(cfg: Config, ctx) -> dict:
    from shared.lm import models
    from shared.lm.training import CheckpointStore, TrainRow, build_examples, train_lora

    raw = store.read_jsonl(cfg.data_uri)
    if not raw:
        raise StageInputError(f"no training rows in {cfg.data_uri}")
    try:
        rows = [TrainRow.model_validate(r) for r in raw]
    except ValueError as err:
        raise StageInputError(f"bad training row in {cfg.data_uri}: {str(err).splitlines()[0]}") from None
    tokenizer = models.load_tokenizer(cfg.model_ref)
    try:
        examples, dropped = build_examples(tokenizer, rows, loss=cfg.loss, marker=cfg.marker, max_seq_len=cfg.recipe.max_seq_len)
    except ValueError as err:
        raise StageInputError(f"{cfg.data_uri}: {err}") from None
    if not examples:
        raise StageInputError(f"every training row is longer than max_seq_len={cfg.recipe.max_seq_len}")
    n_pos = sum(1 for r in rows if r.positive)
    ctx.log(f"{len(examples)} examples ({n_pos} positive, {dropped} dropped as too long), loss={cfg.loss}, "
            f"r={cfg.recipe.r}, lr={cfg.recipe.lr}, effective batch {cfg.recipe.effective_batch_size}")
    model = models.load_model(cfg.model_ref, dtype=cfg.dtype)
    checkpoint = CheckpointStore(ctx.out("checkpoint", "state.pt"), key=cfg.config_hash() + ":" + store.sha256(cfg.data_uri))
    model, result = train_lora(model, tokenizer, examples, cfg.recipe, seed=cfg.seed, checkpoint=checkpoint,
                               checkpoint_every=cfg.checkpoint_every, log=ctx.log, progress=ctx.progress,
                               on_step=lambda record: ctx.track.log(record, step=record["step"]))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        store.upload_dir(tmp, ctx.out("adapter"))
    checkpoint.clear()  # the adapter supersedes it; a finished stage keeps only its real outputs
    store.write_jsonl(ctx.out("train_log.jsonl"), result.losses)
    first = result.losses[0]["loss"] if result.losses else None
    return {
        "steps": result.steps, "epochs": result.epochs, "n_examples": result.n_examples, "n_positive": n_pos,
        "n_dropped": dropped, "first_loss": first, "final_loss": result.final_loss,
        "resumed_from_step": result.resumed_from_step, "train_wall_s": round(result.wall_s, 2),
    }


SPEC = StageSpec(
    name="train_lora", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=6 * 3600),
    description="LoRA SFT (assistant-token or marker-only loss); saves the adapter with save_pretrained.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
