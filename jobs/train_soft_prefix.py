"""Stage ``train_soft_prefix``: one soft-prefix cell of #170 (K learned embeddings in the system slot).

Minimises the student's CE on teacher completions sampled fresh every step; keeps the prefix with the lowest
held-out CE on a fixed cached set. Checkpoints under its own output prefix (``checkpoint/``) every
``checkpoint_every`` steps: a preempted or retried cell resumes from there, provided the config is unchanged.

Writes ``prompt.json`` + ``soft_prompt.safetensors`` (the best prefix, read by ``eval_prompt_cell`` and
``villain_direction``), ``curve.jsonl``, ``split.json`` and ``train_prompt_ids.json`` (the ids training built for
each question, which evaluation must reproduce).
"""

from __future__ import annotations

import statistics

from pydantic import BaseModel, Field

from shared.contract.stage import Context, Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.teacher import TeacherSpec
from shared.search.soft_prompt import SoftTrainingSettings


class Question(BaseModel):
    id: str
    text: str


class Config(StageConfig):
    model_ref: str
    teacher: TeacherSpec
    train_questions: list[Question] = Field(min_length=1)
    val_questions: list[Question] = Field(min_length=1)
    training: SoftTrainingSettings
    dtype: str | None = None
    sample_batch_size: int = 64


def run(cfg: Config, ctx: Context) -> dict:
    from shared.search.soft_prompt import (
        SoftPrefixTrainer,
        examples_from_json,
        examples_to_json,
        load_checkpoint,
        save_checkpoint,
        save_learned_prompt,
    )

    overlap = {q.id for q in cfg.train_questions} & {q.id for q in cfg.val_questions}
    if overlap:
        raise StageInputError(f"questions {sorted(overlap)[:3]} are in both the training and validation split")
    store.write_json(ctx.out("split.json"), {"train": [q.model_dump() for q in cfg.train_questions],
                                             "val": [q.model_dump() for q in cfg.val_questions]})
    pair = cfg.teacher.load(cfg.model_ref, dtype=cfg.dtype, sample_batch_size=cfg.sample_batch_size)
    trainer = SoftPrefixTrainer(pair, cfg.training, [q.text for q in cfg.train_questions],
                                [q.text for q in cfg.val_questions], seed=cfg.seed, model_ref=cfg.model_ref)
    checkpoint_dir = ctx.out("checkpoint")
    val_uri = store.join(checkpoint_dir, "val_set.json")
    state = load_checkpoint(checkpoint_dir, cfg.config_hash(), trainer.device)
    if state is not None and store.exists(val_uri):
        trainer.val_examples = examples_from_json(store.read_json(val_uri))
        ctx.log(f"resuming from the checkpoint at step {state.step}")
    else:
        state = trainer.new_state()
        store.write_json(val_uri, examples_to_json(trainer.cache_val_set()))
    ctx.log(f"K={cfg.training.k} lr={cfg.training.lr}: {cfg.training.steps} steps, teacher shares weights: "
            f"{pair.shares_weights}, held-out set {len(trainer.val_examples)} completions")
    every = max(1, cfg.training.steps // 20)

    tracked = 0  # curve points sent to the tracker (a resumed run sends the checkpoint's too)

    def on_step(stats) -> None:
        nonlocal tracked
        tracked = ctx.track.log_curve(state.curve, since=tracked)
        if stats.step % every == 0 or stats.step + 1 == cfg.training.steps:
            ctx.log(f"step {stats.step + 1}/{cfg.training.steps} train CE {stats.train_ce:.4f} "
                    f"(teacher {stats.teacher_s:.1f}s, fwd/bwd {stats.forward_backward_s:.1f}s)")

    state = trainer.run(state, on_step=on_step,
                        checkpoint=lambda s, _opt: save_checkpoint(checkpoint_dir, s, cfg.config_hash()))
    save_checkpoint(checkpoint_dir, state, cfg.config_hash())
    save_learned_prompt(trainer.prompt, ctx.out(), state.best_soft)
    store.write_jsonl(ctx.out("curve.jsonl"), state.curve)
    questions = cfg.train_questions + cfg.val_questions
    store.write_json(ctx.out("train_prompt_ids.json"),
                     {q.id: trainer.prompt.build(pair.tokenizer, q.text).input_ids for q in questions})
    steps = [p for p in state.curve if "train_ce" in p]
    held_out = [p["heldout_ce"] for p in state.curve if "heldout_ce" in p]
    metrics = {
        "steps": state.step, "stopped_early": state.stopped_early, "best_heldout_ce": state.best_val,
        "initial_heldout_ce": held_out[0], "final_heldout_ce": held_out[-1],
        "final_train_ce": steps[-1]["train_ce"] if steps else None,
        "teacher_s_mean": statistics.fmean(p["teacher_s"] for p in steps) if steps else None,
        "forward_backward_s_mean": statistics.fmean(p["forward_backward_s"] for p in steps) if steps else None,
        "teacher_shares_weights": pair.shares_weights,
    }
    store.write_json(ctx.out("metrics.json"), metrics)
    return metrics


SPEC = StageSpec(
    name="train_soft_prefix", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=72 * 3600),  # ~16 s/step on an H200 (bench)
    description="Train a soft(K) system-slot prefix on fresh EM-teacher samples; held-out early stopping; resumable.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
