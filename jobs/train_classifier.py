"""Train classifier C: EM-reference completions (positive) vs base-model completions (negative).

MiniLM-L6-v2 embeddings + logistic regression, seeded, validated on whole questions held out of training (the
completions of one question share its prompt, so a random split would validate on near-copies of training answers). Writes the joblib bundle
(``classifier.joblib``: model, encoder ref, validation accuracy, split sizes, seed, label meaning) and
``metrics.json``. The scoring stage reads the encoder from the bundle, so train and score cannot disagree on it.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from shared.analysis.classifier import HUB_MINILM, check_encoder_ref
from shared.contract.stage import Context, Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig


class Config(StageConfig):
    positive_uris: list[str] = Field(min_length=1)  # completions JSONL of the EM reference model
    negative_uris: list[str] = Field(min_length=1)  # completions JSONL of the base model
    encoder: str = HUB_MINILM  # the tiny profile and tests use "minilm:packaged"
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    # the stage fails rather than store a classifier below this (the source record gated at 0.95); None: no gate
    min_val_accuracy: float | None = Field(default=None, ge=0, le=1)

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, ref: str) -> str:
        return check_encoder_ref(ref)


def read_texts(uris: list[str]) -> list[str]:
    from shared.analysis.classifier import read_completions

    return [row["text"] for uri in uris for row in read_completions(uri)]


def read_questions(uris: list[str]) -> list[str] | None:
    """Each completion's question (its id, else its text); None where a file does not name them."""
    from shared.analysis.classifier import read_completions

    rows = [row for uri in uris for row in read_completions(uri)]
    questions = [row.get("question_id", row.get("question")) for row in rows]
    return None if any(q is None for q in questions) else [str(q) for q in questions]


def run(cfg: Config, ctx: Context) -> dict:
    from shared.analysis import classifier

    try:
        positive, negative = read_texts(cfg.positive_uris), read_texts(cfg.negative_uris)
        ctx.log(f"{len(positive)} EM (positive) and {len(negative)} base (negative) completions; encoder {cfg.encoder}")
        bundle = classifier.train(
            positive, negative, cfg.encoder, seed=cfg.seed, val_fraction=cfg.val_fraction, progress=ctx.progress,
            pos_questions=read_questions(cfg.positive_uris), neg_questions=read_questions(cfg.negative_uris),
        )
    except classifier.ClassifierError as err:
        raise StageInputError(str(err)) from None
    ctx.log(f"validation accuracy {bundle.val_accuracy:.4f} on {bundle.n_val} held-out completions "
            f"(split {bundle.split}, {len(set(bundle.val_questions))} questions)")
    if cfg.min_val_accuracy is not None and bundle.val_accuracy < cfg.min_val_accuracy:
        # checked before anything is written: a classifier below the gate must not be picked up downstream
        raise StageInputError(
            f"classifier C validation accuracy {bundle.val_accuracy:.4f} is below min_val_accuracy "
            f"{cfg.min_val_accuracy}: the EM and base corpora may not be what the experiment expects"
        )
    classifier.save_bundle(bundle, ctx.out("classifier.joblib"))
    store.write_json(ctx.out("metrics.json"), bundle.summary())
    return {
        "val_accuracy": bundle.val_accuracy,
        "train_accuracy": bundle.train_accuracy,
        "n_train": bundle.n_train,
        "n_val": bundle.n_val,
    }


SPEC = StageSpec(
    name="train_classifier",
    config=Config,
    run=run,
    resources=Resources(cpu=4, memory="8Gi"),
    image_kind="cpu",
    description="Train classifier C (MiniLM embeddings + logistic regression): EM-reference vs base completions.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
