"""Score completions with classifier C: P(completion comes from the EM reference model) for each one.

Writes ``c_scores.jsonl`` (one row per completion: condition, question_id, sample, c) and ``metrics.json``
(``c_mean`` over all rows, ``n``, and the mean per condition, which is the C of that condition).
"""

from __future__ import annotations

from collections import defaultdict

from shared.contract.stage import Context, Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig

ROW_KEYS = ("condition", "question_id", "sample")


class Config(StageConfig):
    classifier_uri: str  # the bundle written by train_classifier
    completions_uri: str  # completions JSONL from the generate stage


def mean_by_condition(rows: list[dict]) -> dict[str, float]:
    scores: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        scores[str(row["condition"])].append(row["c"])
    return {condition: sum(cs) / len(cs) for condition, cs in sorted(scores.items())}


def run(cfg: Config, ctx: Context) -> dict:
    from shared.analysis import classifier

    try:
        bundle = classifier.load_bundle(cfg.classifier_uri)
        completions = classifier.read_completions(cfg.completions_uri)
    except classifier.ClassifierError as err:
        raise StageInputError(str(err)) from None
    if not completions:
        raise StageInputError(f"no completions to score in {cfg.completions_uri}")
    ctx.log(f"scoring {len(completions)} completions (classifier val accuracy {bundle.val_accuracy:.4f})")
    c = classifier.score(bundle, [row["text"] for row in completions], progress=ctx.progress)
    rows = [{**{key: row.get(key) for key in ROW_KEYS}, "c": float(ci)} for row, ci in zip(completions, c, strict=True)]
    metrics = {"c_mean": sum(r["c"] for r in rows) / len(rows), "n": len(rows)}
    store.write_jsonl(ctx.out("c_scores.jsonl"), rows)
    store.write_json(
        ctx.out("metrics.json"),
        {**metrics, "c_by_condition": mean_by_condition(rows), "classifier": bundle.summary()},
    )
    return metrics


SPEC = StageSpec(
    name="score_classifier",
    config=Config,
    run=run,
    resources=Resources(cpu=2, memory="4Gi"),
    image_kind="cpu",
    description="Score completions with classifier C; C of a condition is the mean over its completions.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
