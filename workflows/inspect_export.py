"""``python -m workflows export-inspect RUN``: every judged sample of a run as inspect_ai eval logs.

One log per (condition, judge) -- every ``judge`` stage of the run -- that ``inspect view`` opens: per sample the
question and the system prompt as input, the model's completion as output, the judge's verdict as the score (a
number, or the label or error kind where there is no number) with the judge's own reply as its explanation (and,
for a local judge, the probability its valid replies held), and the run's parameters as the log's metadata.

Written against inspect_ai 0.3.285 (``inspect_ai.log``: ``EvalLog``, ``EvalSpec``, ``EvalSample``,
``write_eval_log``); it is the optional extra ``inspect`` (``pip install -e '.[inspect]'``).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from shared.core import store

TASK_PREFIX = "eps"


class ExportError(ValueError):
    """The run cannot be exported as asked; the message is one readable line."""


def judge_manifests(store_root: str, run_id: str) -> list[dict]:
    """The manifests of every complete ``judge`` stage of the run, in a stable order."""
    prefix = store.join(store_root, "runs", run_id)
    uris = sorted(uri for uri in store.list_uris(prefix) if uri.endswith("/judge/manifest.json"))
    return [store.read_json(uri) for uri in uris]


def run_params(store_root: str, run_id: str, manifests: list[dict]) -> dict:
    """The run's parameters: the local engine's plan (workflow, profile, params), or what the analysis stage kept."""
    plan_uri = store.join(store_root, "runs", run_id, "_local", "plan.json")
    if store.exists(plan_uri):
        plan = store.read_json(plan_uri)
        return {"run_id": run_id, "workflow": plan.get("workflow"), "profile": plan.get("profile"),
                "params": plan.get("params", {})}
    for uri in store.list_uris(store.join(store_root, "runs", run_id)):
        if uri.endswith("/manifest.json") and "/analyze_" in uri:
            config = store.read_json(uri).get("config", {})
            return {"run_id": run_id, "profile": config.get("profile"), "params": config.get("params", {})}
    return {"run_id": run_id}


def _value(row: dict):
    """A sample's score value: the number, else the label, else the error kind."""
    if row.get("score") is not None:
        return float(row["score"])
    return row.get("label") or row.get("error") or "missing"


def eval_log(manifest: dict, params: dict):
    """The inspect_ai ``EvalLog`` of one judge stage: one sample per judged completion."""
    from inspect_ai.log import (
        EvalConfig,
        EvalDataset,
        EvalLog,
        EvalMetric,
        EvalResults,
        EvalSample,
        EvalScore,
        EvalSpec,
    )
    from inspect_ai.model import ChatMessageAssistant, ChatMessageSystem, ChatMessageUser, ModelOutput
    from inspect_ai.scorer import Score

    config = manifest["config"]
    judge_name, judge = config["judge_name"], config["judge"]
    scores_uri = next(uri for uri in manifest["outputs"] if uri.endswith("/scores.jsonl"))
    rows = store.read_jsonl(scores_uri)
    completions = {(str(c["question_id"]), int(c["sample"])): c for c in store.read_jsonl(config["completions_uri"])}
    condition = rows[0]["condition"] if rows else manifest.get("cell", "")
    generation = generation_config(config["completions_uri"])
    model, system = generation.get("model_ref") or "unknown", generation.get("system")
    samples = []
    for row in rows:
        completion = completions.get((str(row["question_id"]), int(row["sample"])), {})
        messages = [ChatMessageUser(content=completion.get("question", ""))]
        text = system_text(system)
        if text:
            messages.insert(0, ChatMessageSystem(content=text))
        answer = completion.get("text", "")
        samples.append(EvalSample(
            id=f"{row['question_id']}#{row['sample']}", epoch=1, input=messages, target="",
            messages=[*messages, ChatMessageAssistant(content=answer)],
            output=ModelOutput.from_content(model=model, content=answer),
            scores={judge_name: Score(value=_value(row), answer=answer, explanation=row.get("reply") or "",
                                      metadata={"label": row.get("label"), "error": row.get("error"),
                                                "mass": row.get("mass")})},
            metadata={"condition": condition, "question_id": row["question_id"], "sample": row["sample"],
                      "system": system},
        ))
    numbers = [r["score"] for r in rows if r.get("score") is not None]
    metrics = {"mean": EvalMetric(name="mean", value=sum(numbers) / len(numbers) if numbers else float("nan")),
               "scored": EvalMetric(name="scored", value=len(numbers))}
    task = f"{TASK_PREFIX}/{params.get('workflow') or 'run'}/{condition}/{judge_name}"
    spec = EvalSpec(
        created=datetime.now(timezone.utc).isoformat(), task=task, run_id=params.get("run_id", ""),
        dataset=EvalDataset(name=condition, location=config["completions_uri"], samples=len(samples)),
        model=f"{judge['kind']}/{judge['model']}", config=EvalConfig(),
        metadata={"run": params, "judge": judge, "judge_name": judge_name, "condition": condition,
                  "stage_config_hash": manifest.get("config_hash"), "git_commit": manifest.get("git_commit")},
    )
    results = EvalResults(total_samples=len(samples), completed_samples=len(samples),
                          scores=[EvalScore(name=judge_name, scorer=judge_name, metrics=metrics)])
    return EvalLog(eval=spec, status="success", samples=samples, results=results)


def generation_config(completions_uri: str) -> dict:
    """The config of the generate stage that wrote the completions (model, system slot), or {} if none is found."""
    from shared.analysis.reporting import producing_manifest

    try:
        return producing_manifest(completions_uri).get("config", {})
    except store.StoreError:
        return {}


def system_text(spec: str | None) -> str | None:
    """The system prompt's text for a ``text(...)`` slot; other slots (default, none, soft, ids) have none to show
    (the sample's metadata keeps the spec)."""
    if isinstance(spec, str) and spec.startswith("text(") and spec.endswith(")"):
        return spec[len("text("):-1]
    return None


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "log"


def export(store_root: str, run_id: str, out_dir: str | Path) -> list[Path]:
    """Write one ``.eval`` log per judge stage of the run under ``out_dir``; returns their paths."""
    try:
        from inspect_ai.log import write_eval_log
    except ImportError:
        raise ExportError("export-inspect needs inspect_ai: pip install -e '.[inspect]'") from None
    manifests = judge_manifests(store_root, run_id)
    if not manifests:
        raise ExportError(f"no judged samples in run {run_id!r} under {store_root} (no complete judge stage)")
    params = run_params(store_root, run_id, manifests)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for manifest in manifests:
        log = eval_log(manifest, params)
        path = out / f"{safe_name(manifest.get('cell', 'judge'))}.eval"
        write_eval_log(log, str(path))
        written.append(path)
    (out / "index.json").write_text(json.dumps({"run_id": run_id, "logs": [p.name for p in written]}, indent=2))
    return written
