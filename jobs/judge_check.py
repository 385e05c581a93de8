"""Stage ``judge_check``: does a judge tell known-good answers from known-bad ones (a gross-failure check), and does
it order graded answers as written?

Scores a project-written items file (``package:judges/<name>.jsonl`` of question, answer, expected and, for graded
items, an anchor score) with one judge, through the same ``shared.judge`` code and cache as the ``judge`` stage, and
stores ``check.json``: the AUC of the high group (aligned, or coherent) over the low group, its permutation
p-value, each group's mean, n, errors (abstentions among them), a verdict, and the graded items' rank correlation
with their anchors (``shared.judge.check``). A workflow reports it beside the scores of that judge: scores from a
judge that fails the gross-failure check mean nothing.
"""

from __future__ import annotations

import hashlib

from pydantic import field_validator, model_validator

from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.judge.spec import JudgeSpec

DEFAULT_ITEMS = "package:judges/alignment_check_v2.jsonl"
COHERENCE_ITEMS = "package:judges/coherence_check_v1.jsonl"


class Config(StageConfig):
    judge: JudgeSpec
    judge_name: str
    items_file: str = DEFAULT_ITEMS  # package:<path> or a path that exists where the stage runs
    # the items' content hash, pinned when the config is made: the items are read from a file, so their content
    # (not only the file's name) must decide whether a stored result is reused
    items_sha256: str | None = None
    # a cache, not an input: it changes as other cells are judged and must not invalidate this check
    cache_root: str | None = None

    @field_validator("items_file")
    @classmethod
    def _items_parse(cls, ref: str) -> str:
        from pathlib import Path

        from shared.core.datafiles import PACKAGE_PREFIX
        from shared.judge.check import read_items

        read_items(ref)  # a bad items file fails when the plan is built
        # absolute: the stage may start in another folder than the plan was built in
        return ref if ref.startswith(PACKAGE_PREFIX) else str(Path(ref).expanduser().resolve())

    @model_validator(mode="after")
    def _pin_items(self) -> Config:
        sha = items_sha256(self.items_file)
        if self.items_sha256 is None:
            self.items_sha256 = sha
        elif self.items_sha256 != sha:
            raise ValueError(f"judge check items {self.items_file} changed since the plan was built: build it again")
        return self


def items_sha256(ref: str) -> str:
    from shared.core.datafiles import read_text

    return hashlib.sha256(read_text(ref, "judge check items").encode()).hexdigest()


def run(cfg: Config, ctx) -> dict:
    from shared.judge import JudgeAuthError, JudgeConfigError, JudgeItem, make_judge
    from shared.judge.cache import run_store_cache_uri
    from shared.judge.check import read_items, summarize_check

    items = read_items(cfg.items_file)
    cache = cfg.cache_root or run_store_cache_uri(cfg.store)
    ctx.log(f"checking {cfg.judge_name} ({cfg.judge.kind}:{cfg.judge.model}, {cfg.judge.template}) "
            f"on {len(items)} known answers from {cfg.items_file}")
    try:
        results = make_judge(cfg.judge, cache).judge(
            [JudgeItem(id=item.id, question=item.question, answer=item.answer) for item in items])
    except (JudgeAuthError, JudgeConfigError) as err:
        raise StageInputError(str(err)) from None
    rows = [{"id": item.id, "expected": item.expected, "anchor": item.anchor, "score": result.score,
             "label": result.label, "error": result.error, "reply": result.raw, "mass": result.mass}
            for item, result in zip(items, results, strict=True)]
    summary = summarize_check([r["expected"] for r in rows], [r["score"] for r in rows], seed=cfg.seed,
                              anchors=[r["anchor"] for r in rows])
    errors: dict[str, int] = {}
    for row in rows:
        if row["error"] is not None:
            errors[row["error"]] = errors.get(row["error"], 0) + 1
    check = {
        "judge_name": cfg.judge_name, "judge": cfg.judge.model_dump(), "items_file": cfg.items_file,
        "items_sha256": cfg.items_sha256, "n_items": len(rows), **summary,
        "n_errors": sum(errors.values()), "errors_by_kind": errors,
        "n_labelled": sum(r["label"] is not None for r in rows),
    }
    store.write_jsonl(ctx.out("scores.jsonl"), rows)
    store.write_json(ctx.out("check.json"), check)
    auc_text = "n/a" if check["auc"] is None else f"{check['auc']:.3f} (p={check['p_value']:.3g})"
    ctx.log(f"AUC {auc_text}: {check['verdict']}")
    return {key: check[key] for key in ("auc", "p_value", "mean_high", "mean_low", "n_errors", "verdict")}


SPEC = StageSpec(
    name="judge_check", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=2, memory="4Gi", timeout_s=3600),
    description="Judge sanity check: AUC of the judge's scores on known-aligned vs known-misaligned answers.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
