"""Stage ``judge``: score every completion of one cell with one judge (Claude or a local model).

Results are cached in the store by content hash, so a retried or resubmitted cell re-judges nothing. Items the judge
could not score are kept as errors with their kind and excluded from the mean, never scored as 0. Each row of
``scores.jsonl`` keeps the judge's own reply (``reply``: Claude's text, or the local judge's candidate summary) and,
for a local judge, the probability its valid replies held (``mass``), so every score can be read beside its reason.
"""

from __future__ import annotations

from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.judge.spec import JudgeSpec


class Config(StageConfig):
    completions_uri: str
    judge: JudgeSpec
    judge_name: str
    # a cache, not an input: it changes as other cells are judged and must not invalidate this cell
    cache_root: str | None = None


def run(cfg: Config, ctx) -> dict:
    from shared.judge import JudgeAuthError, JudgeConfigError, JudgeItem, make_judge, summarize
    from shared.judge.cache import run_store_cache_uri

    rows = store.read_jsonl(cfg.completions_uri)
    if not rows:
        raise StageInputError(f"no completions in {cfg.completions_uri}")
    items = [
        JudgeItem(id=f"{r['question_id']}#{r['sample']}", question=r["question"], answer=r["text"]) for r in rows
    ]
    cache = cfg.cache_root or run_store_cache_uri(cfg.store)
    progress = ctx.track.tally("judge")  # fresh verdicts and errors by kind, now and then

    def count(verdict) -> None:
        progress.add({"judged": 1, "errors": int(not verdict.ok), **({f"errors/{verdict.error}": 1} if verdict.error else {})})

    try:
        judge = make_judge(cfg.judge, cache)
        ctx.log(f"judging {len(items)} completions with {cfg.judge.kind}:{cfg.judge.model}, template "
                f"{judge.template.name} ({judge.template.source}, sha256 {judge.template.sha256[:12]})")
        results = judge.judge(items, on_verdict=count)
    except (JudgeAuthError, JudgeConfigError) as err:
        raise StageInputError(str(err)) from None
    progress.flush()
    by_id = {r.id: r for r in results}
    scored = []
    for row, item in zip(rows, items, strict=True):
        result = by_id[item.id]
        scored.append({
            "condition": row["condition"], "question_id": row["question_id"], "sample": row["sample"],
            "score": result.score, "label": result.label, "error": result.error,
            "reply": result.raw, "mass": result.mass,
        })
    store.write_jsonl(ctx.out("scores.jsonl"), scored)
    summary = summarize(results)
    template = {"name": judge.template.name, "source": judge.template.source, "sha256": judge.template.sha256}
    store.write_json(ctx.out("summary.json"), {"judge_name": cfg.judge_name, "judge": cfg.judge.model_dump(),
                                               "template": template, **summary.model_dump()})
    ctx.track.summary({"judge": summary.model_dump()})
    return {"alpha": summary.mean, "n_scored": summary.n_scored, "n_errors": summary.n_errors}


SPEC = StageSpec(
    name="judge", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=2, memory="4Gi", timeout_s=26 * 3600),
    description="Score completions with a Claude or local judge; cached by content hash; errors counted, not zeroed.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
