"""The GPU cost of stage tasks: what a task does (tokens sampled, tokens trained, tokens scored) times what that
costs on a GPU class, calibrated on the GPU benchmarks in ``bench/results/``.

The rates are those of a Qwen2.5-7B-shaped model (the bench's); a smaller model costs less than its estimate.

GPU-seconds of one task on class ``c`` =
    startup_s[c]
    + tokens_sampled x sample_s_per_token[c]    (every row to its max_new_tokens: a batch runs until its longest row)
    + tokens_trained x train_s_per_token[c]     (forward and backward)
    + tokens_scored  x score_s_per_token[c]     (forward only: GCG candidates, activations, held-out CE)
and GPU-hours = GPU-seconds x the task's GPUs / 3600.

The counts come from the task's config (and, for a training set another task writes, from that task's config;
for one that is a file in the store, from its rows and characters, at CHARS_PER_TOKEN), so the same estimate is
made before a plan is submitted and in the report afterwards. Where a count cannot be known (a training file that
was not read), the task is costed at its deadline (``Resources.timeout_s`` x GPUs): the most it can take, marked
as a bound. Steps of the trainers are their maximum
(early stopping only makes them shorter). What the model leaves out, said once here: model loading and downloads,
the batch size (rates are at the bench's large batches; a small batch samples slower per token), vLLM (generation
is costed at the project's HF sampler's measured rate), API judges (not GPU time).

The rates are ``shared/data/cost/rates.json``, written by ``python -m workflows.cost --calibrate`` from the
bench results; ``calibrate`` below is the formula, and a test checks the shipped file against it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

RATES_FILE = "cost/rates.json"  # under shared/data
GPU_CLASSES = ("h100", "h200")


# ---------------------------------------------------------------------------------------------------------------
# calibration: the bench numbers behind every rate


def _read(bench: Path, name: str) -> dict:
    return json.loads((bench / name).read_text())


def calibrate(bench: Path) -> dict[str, Any]:
    """The rates per GPU class from the bench result files in ``bench`` (``bench/results``).

    H200: measured directly with the code paths the stages run (the fast sampler, the student's forward/backward,
    GCG's candidate evaluation). H100: the candidate evaluation is measured on both; the sampler and the
    forward/backward of today's code only on the H200, so the H100's are the H200's times the H100/H200 ratio of
    the same step measured on both machines in the earlier bench (``gpu_h{100,200}_qwen7b.json``).
    """
    fast = _read(bench, "gpu_h200_qwen7b_fast_paths.json")
    student = _read(bench, "gpu_h200_qwen7b_student_paths.json")
    old = {c: _read(bench, f"gpu_{c}_qwen7b.json") for c in GPU_CLASSES}

    sampling = fast["sampling_fast_B320_ids_fixed"]
    sample_h200 = sampling["seconds"] / (sampling["rows"] * sampling["max_new_tokens"])
    step = student["soft_step_separate_fixed_current_micro16384"]
    train_h200 = step["forward_backward_s"] / step["student_tokens"]
    prompt_tokens = step["student_tokens"] / step["pairs"] - step["max_new_tokens"]

    def score(c: str) -> float:
        measured = old[c]["gcg_candidate_eval"]["candidate_eval"]
        return measured["seconds"] / measured["tokens"]

    def h100_over_h200(key: str) -> float:
        return old["h100"]["soft_prefix_train_step"][key] / old["h200"]["soft_prefix_train_step"][key]

    startup = fast["compile_plain"]["compile_s"]
    return {
        "prompt_tokens": round(prompt_tokens, 3),
        "classes": {
            "h200": {"sample_s_per_token": sample_h200, "train_s_per_token": train_h200,
                     "score_s_per_token": score("h200"), "startup_s": startup},
            "h100": {"sample_s_per_token": sample_h200 * h100_over_h200("teacher_s"),
                     "train_s_per_token": train_h200 * h100_over_h200("forward_backward_s"),
                     "score_s_per_token": score("h100"), "startup_s": startup},
        },
        "sources": {
            "sample_s_per_token": "h200: gpu_h200_qwen7b_fast_paths.json sampling_fast_B320_ids_fixed seconds / "
                                  "(rows x max_new_tokens); h100: x teacher_s h100/h200 (gpu_h*_qwen7b.json "
                                  "soft_prefix_train_step)",
            "train_s_per_token": "h200: gpu_h200_qwen7b_student_paths.json soft_step_separate_fixed_current_micro16384 "
                                 "forward_backward_s / student_tokens; h100: x forward_backward_s h100/h200 "
                                 "(gpu_h*_qwen7b.json soft_prefix_train_step)",
            "score_s_per_token": "gpu_h*_qwen7b.json gcg_candidate_eval.candidate_eval seconds / tokens",
            "startup_s": "gpu_h200_qwen7b_fast_paths.json compile_plain.compile_s (the sampler's compile, once per "
                         "process; not measured on the h100: the h200's)",
            "prompt_tokens": "gpu_h200_qwen7b_student_paths.json soft_step_separate_fixed_current_micro16384 "
                             "student_tokens / pairs - max_new_tokens",
        },
    }


def rates() -> dict[str, Any]:
    """The shipped calibration (``shared/data/cost/rates.json``)."""
    return json.loads(resources.files("shared.data").joinpath(RATES_FILE).read_text())


# ---------------------------------------------------------------------------------------------------------------
# what a task does


@dataclass
class Workload:
    tokens_sampled: float = 0
    tokens_trained: float = 0
    tokens_scored: float = 0
    # None: the counts are known; else why they are not (the task is then costed at its deadline)
    unknown: str | None = None

    def __add__(self, other: Workload) -> Workload:
        return Workload(self.tokens_sampled + other.tokens_sampled, self.tokens_trained + other.tokens_trained,
                        self.tokens_scored + other.tokens_scored, self.unknown or other.unknown)


# Upstream(uri) -> (stage, full config) of the task that writes ``uri``; (FILE, {"rows", "chars"}) for a file in
# the store that could be read; None when neither is known
Upstream = Callable[[str], "tuple[str, dict] | None"]
FILE = "file"
CHARS_PER_TOKEN = 4.0  # a training file's tokens per row: its characters / 4 (English text, BPE: an assumption)


def _n(items: Sequence | dict | None) -> int:
    return len(items or [])


def _sampling(rows: float, max_new: int) -> Workload:
    return Workload(tokens_sampled=rows * max_new)


def _generate(cfg: dict, _up: Upstream, p: float) -> Workload:
    return _sampling(_n(cfg["questions"]) * cfg["n"], cfg["max_new_tokens"])


def _marker_eval(cfg: dict, _up: Upstream, p: float) -> Workload:
    return _sampling(_n(cfg["personas"]) * _n(cfg["questions"]) * cfg["n"], cfg["max_new_tokens"])


def _marker_data_rows(cfg: dict) -> int:
    return (1 + cfg["n_negative_personas"]) * _n(cfg["questions"]) * cfg["n_per_question"]


def _marker_data(cfg: dict, _up: Upstream, p: float) -> Workload:
    return _sampling(_marker_data_rows(cfg), cfg["max_new_tokens"])


def _extract_persona_vectors(cfg: dict, _up: Upstream, p: float) -> Workload:
    prompts = _n(cfg["personas"]) * _n(cfg["questions"])
    work = Workload(tokens_scored=prompts * p) if "A" in cfg["methods"] else Workload()
    if "B" in cfg["methods"]:  # greedy replies, then one forward over prompt + reply
        work += Workload(tokens_sampled=prompts * cfg["max_new_tokens"],
                         tokens_scored=prompts * (p + cfg["max_new_tokens"]))
    return work


def _hidden_states(cfg: dict, _up: Upstream, p: float) -> Workload:
    return Workload(tokens_scored=_n(cfg["personas"]) * _n(cfg["questions"]) * p)


def _villain_direction(cfg: dict, _up: Upstream, p: float) -> Workload:
    # every persona, the pirate, the reference, each cell and fixed prompt: one forward per probe
    prompts = _n(cfg["personas"]) + 2 + _n(cfg["cell_prompt_uris"]) + _n(cfg["fixed_prompts"])
    return Workload(tokens_scored=prompts * _n(cfg["probes"]) * p)


def _heldout_anchors(cfg: dict, up: Upstream, p: float) -> Workload:
    total = Workload()
    for cell in cfg["cells"].values():  # the cell's own prompt and every anchor on the cell's held-out pairs
        writer = up(cell["heldout_uri"])
        if writer is None:
            return Workload(unknown=f"held-out set {cell['heldout_uri']} is not written by a task of the plan")
        draws = writer[1]["training"] if writer[0] == "train_soft_prefix" else writer[1]["search"]
        rows = _n(cfg["val_questions"]) * draws["val_completions_per_question"]
        total += Workload(tokens_scored=(1 + len(cfg["anchors"])) * rows * (p + draws["max_new_tokens"]))
    return total


def _train_soft_prefix(cfg: dict, _up: Upstream, p: float) -> Workload:
    t = cfg["training"]
    rows = min(t["questions_per_step"], _n(cfg["train_questions"])) * t["completions_per_question"]
    val_rows = _n(cfg["val_questions"]) * t["val_completions_per_question"]
    evaluations = t["steps"] // t["val_every"]
    return Workload(
        tokens_sampled=(t["steps"] * rows + val_rows) * t["max_new_tokens"],  # fresh draws each step, one held-out set
        tokens_trained=t["steps"] * rows * (p + t["max_new_tokens"]),
        tokens_scored=evaluations * val_rows * (p + t["max_new_tokens"]),
    )


def gcg_candidates_per_step(search: dict, pairs: int) -> int:
    """Candidate-pair evaluations of one GCG step: with the screen, every candidate on ``screen_pairs`` pairs and
    the ``screen_keep`` best on the others; without it, every candidate on every pair."""
    width = search["search_width"]
    screen = search["screen_pairs"]
    if screen is not None and screen < pairs and search["screen_keep"] < width:
        return width * screen + search["screen_keep"] * (pairs - screen)
    return width * pairs


def _gcg_search(cfg: dict, _up: Upstream, p: float) -> Workload:
    s = cfg["search"]
    row = p + s["length"] + s["max_new_tokens"]
    val_rows = _n(cfg["val_questions"]) * s["val_completions_per_question"]
    held_out = Workload(tokens_sampled=val_rows * s["max_new_tokens"], tokens_scored=val_rows * row)
    if cfg["mode"] == "random":
        return held_out
    pairs = min(s["questions_per_step"], _n(cfg["train_questions"])) * s["completions_per_question"]
    steps = s["steps"]
    candidates = steps * gcg_candidates_per_step(s, pairs)
    if gcg_candidates_per_step(s, pairs) < s["search_width"] * pairs:  # the screen's checks: a full evaluation
        candidates += steps // s["screen_check_every"] * s["search_width"] * pairs
    return Workload(
        tokens_sampled=steps * pairs * s["max_new_tokens"] + held_out.tokens_sampled,
        tokens_trained=steps * pairs * row,  # the gradient over the suffix's one-hot ids
        tokens_scored=candidates * row + steps // s["val_every"] * held_out.tokens_scored,
    )


def _train_lora(cfg: dict, up: Upstream, p: float) -> Workload:
    rows, row_tokens = _training_rows(cfg["data_uri"], up, p)
    if rows is None:
        return Workload(unknown=row_tokens)
    recipe = cfg["recipe"]
    row = min(row_tokens, recipe["max_seq_len"])
    examples = recipe["max_steps"] * recipe["per_device_batch_size"] * recipe["grad_accum"] \
        if recipe.get("max_steps") else recipe["epochs"] * rows
    return Workload(tokens_trained=examples * row)


def _training_rows(uri: str, up: Upstream, p: float) -> tuple[int | None, Any]:
    """(rows, tokens per row) of a training set another task of the plan writes (prompt + reply budget) or that is
    a file read from the store (characters / CHARS_PER_TOKEN); (None, why) otherwise."""
    writer = up(uri)
    if writer is None:
        return None, f"training set {uri} is a file in the store that was not read: its size is in no config"
    stage, cfg = writer
    if stage == FILE:
        return cfg["rows"], cfg["chars"] / max(cfg["rows"], 1) / CHARS_PER_TOKEN
    if stage == "marker_data":
        return _marker_data_rows(cfg), p + cfg["max_new_tokens"]
    if stage == "generate":
        return _n(cfg["questions"]) * cfg["n"], p + cfg["max_new_tokens"]
    if stage == "sft_data":
        rows, row = _training_rows(cfg["data_uri"], up, p)
        if rows is None:
            return None, row
        return (min(rows, cfg["limit"]) if cfg.get("limit") else rows), row
    return None, f"training set {uri} comes from stage {stage}, which the cost model does not size"


WORKLOADS: dict[str, Callable[[dict, Upstream, float], Workload]] = {
    "generate": _generate,
    "eval_prompt_cell": _generate,
    "marker_eval": _marker_eval,
    "marker_data": _marker_data,
    "extract_persona_vectors": _extract_persona_vectors,
    "hidden_states": _hidden_states,
    "villain_direction": _villain_direction,
    "heldout_anchors": _heldout_anchors,
    "train_soft_prefix": _train_soft_prefix,
    "gcg_search": _gcg_search,
    "train_lora": _train_lora,
}


# ---------------------------------------------------------------------------------------------------------------
# tasks and their estimates


@dataclass
class TaskRef:
    """A task as the cost model sees it: from a plan (before it runs) or from a manifest (after)."""

    name: str
    stage: str
    config: dict  # every field, defaults filled in
    prefix: str  # its output folder
    gpus: int
    gpu_class: str  # the class its stage declares
    timeout_s: int


@dataclass
class TaskEstimate:
    task: TaskRef
    work: Workload
    gpu_hours: dict[str, float] = field(default_factory=dict)  # per GPU class

    @property
    def bounded(self) -> bool:
        """Costed at its deadline: its counts are not known from configs."""
        return self.work.unknown is not None

    @property
    def declared_hours(self) -> float:
        return self.gpu_hours.get(self.task.gpu_class, 0.0)


def upstream_of(tasks: Iterable[TaskRef], read_s3: bool = False) -> Upstream:
    """The writer of a URI among ``tasks`` (the one whose output folder holds it), else the file itself: its rows
    and characters, read from a local store always and from S3 only when ``read_s3`` (a caller that has already
    reached the store), so that printing an estimate never waits on a network."""
    prefixes = sorted(((t.prefix.rstrip("/") + "/", t) for t in tasks), key=lambda x: -len(x[0]))

    def find(uri: str) -> tuple[str, dict] | None:
        for prefix, task in prefixes:
            if uri.startswith(prefix):
                return task.stage, task.config
        if uri.startswith("file://") or (read_s3 and uri.startswith("s3://")):
            return _file_size(uri)
        return None

    return find


def _file_size(uri: str) -> tuple[str, dict] | None:
    from shared.core import store

    try:
        lines = [line for line in store.read_text(uri).splitlines() if line.strip()]
    except (store.StoreError, OSError, UnicodeDecodeError):
        return None
    return FILE, {"rows": len(lines), "chars": sum(len(line) for line in lines)}


def gpu_seconds(work: Workload, klass: dict) -> float:
    return (klass["startup_s"] + work.tokens_sampled * klass["sample_s_per_token"]
            + work.tokens_trained * klass["train_s_per_token"] + work.tokens_scored * klass["score_s_per_token"])


def estimate_tasks(tasks: Sequence[TaskRef], calibration: dict | None = None, *,
                   read_s3: bool = False) -> list[TaskEstimate]:
    """The estimate of every GPU task in ``tasks`` (CPU tasks cost no GPU time and are left out); training sets
    in S3 are read for their size only with ``read_s3``."""
    cal = calibration or rates()
    up = upstream_of(tasks, read_s3)
    out = []
    for task in tasks:
        if task.gpus <= 0:
            continue
        model = WORKLOADS.get(task.stage)
        if model is None:
            work = Workload(unknown=f"no cost model for stage {task.stage}")
        else:
            try:
                work = model(task.config, up, cal["prompt_tokens"])
            except (KeyError, TypeError) as err:  # a config this model does not read: say so, cost the deadline
                work = Workload(unknown=f"config of {task.stage} lacks what the cost model reads ({err})")
        hours = {}
        for name, klass in cal["classes"].items():
            seconds = task.timeout_s if work.unknown else gpu_seconds(work, klass)
            hours[name] = seconds * task.gpus / 3600
        out.append(TaskEstimate(task, work, hours))
    return out


def tasks_from_manifests(manifests: Iterable[dict]) -> list[TaskRef]:
    refs = []
    for m in manifests:
        res = m.get("resources", {})
        refs.append(TaskRef(name=f"{m['cell']}/{m['stage']}", stage=m["stage"], config=m.get("config", {}),
                            prefix=m.get("prefix", ""), gpus=int(res.get("gpus", 0)),
                            gpu_class=res.get("gpu_class", "none"), timeout_s=int(res.get("timeout_s", 0))))
    return refs


# ---------------------------------------------------------------------------------------------------------------
# tables


def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def by_stage(estimates: Sequence[TaskEstimate]) -> list[dict[str, Any]]:
    """One row per stage: tasks, declared class, summed counts and GPU-hours per class, how many are bounds."""
    rows: dict[str, dict[str, Any]] = {}
    for e in estimates:
        row = rows.setdefault(e.task.stage, {"stage": e.task.stage, "tasks": 0, "class": e.task.gpu_class,
                                             "work": Workload(), "hours": {}, "bounded": 0})
        row["tasks"] += 1
        row["bounded"] += e.bounded
        if not e.bounded:
            row["work"] = row["work"] + e.work
        for klass, hours in e.gpu_hours.items():
            row["hours"][klass] = row["hours"].get(klass, 0.0) + hours
    return sorted(rows.values(), key=lambda r: -max(r["hours"].values(), default=0))


def totals(estimates: Sequence[TaskEstimate]) -> dict[str, float]:
    """GPU-hours in total: on each class for every task, and ``declared`` (each task on its own stage's class)."""
    out = {klass: sum(e.gpu_hours.get(klass, 0.0) for e in estimates) for klass in GPU_CLASSES}
    out["declared"] = sum(e.declared_hours for e in estimates)
    return out


def table(estimates: Sequence[TaskEstimate]) -> str:
    """The Markdown table of ``by_stage`` and the totals; bounded stages are marked with <=."""
    lines = ["| stage | GPU tasks | class | tokens sampled | tokens trained | tokens scored | "
             + " | ".join(f"GPU-h {k}" for k in GPU_CLASSES) + " |",
             "| :--- | ---: | :--- | ---: | ---: | ---: | " + " | ".join("---:" for _ in GPU_CLASSES) + " |"]
    for r in by_stage(estimates):
        bound = "<= " if r["bounded"] else ""
        tasks = f"{r['tasks']}" + (f" ({r['bounded']} at deadline)" if r["bounded"] else "")
        w = r["work"]
        lines.append(f"| {r['stage']} | {tasks} | {r['class']} | {_count(w.tokens_sampled)} | "
                     f"{_count(w.tokens_trained)} | {_count(w.tokens_scored)} | "
                     + " | ".join(f"{bound}{r['hours'].get(k, 0.0):.2f}" for k in GPU_CLASSES) + " |")
    t = totals(estimates)
    bound = "<= " if any(e.bounded for e in estimates) else ""
    lines.append(f"| **total** | {len(estimates)} | | | | | "
                 + " | ".join(f"**{bound}{t[k]:.2f}**" for k in GPU_CLASSES) + " |")
    return "\n".join(lines)


def bounded_reasons(estimates: Sequence[TaskEstimate]) -> list[str]:
    return [f"{e.task.name}: {e.work.unknown}; costed at its deadline ({e.task.timeout_s / 3600:g} h x {e.task.gpus} GPU)"
            for e in estimates if e.bounded]
