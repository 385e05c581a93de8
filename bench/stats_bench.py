"""Time #205's whole pre-registered analysis at full size on synthetic data.

    python -m bench.stats_bench            # writes bench/results/stats_bench.json

The timed code is the analysis stage's own (``jobs.analyze_issue205``: ``results`` - both geometry families of one
seed, M2's robustness axes, the shift tests - ``decisions``, ``behaviour_tests`` and ``report``), fed synthetic arrays
instead of stored artifacts; only reading the artifacts and drawing the figures are left out.
Sizes follow the record: 7 checkpoints (base, E0-E4, benign-SFT) x 2 extraction methods x 5 layers x 12
personas x hidden size 3584, with 240 questions per persona for M3's held-out LDA; 28 questions x 10
completions per persona for the behavioural tests. Every test asks for n_iter = 10,000: M1/M2/M3 in all
three families (150 EM-vs-base cells, 30 benign-vs-base, 150 EM-vs-benign) and H1 (4 testable conditions),
H2, H3; M2's 2**11 sign patterns and H3's 5! orderings are fewer than that and are enumerated exactly.
M3 refits the 5-fold LDA of all 7 checkpoints under every one of its 10,000 label draws. Method B carries a
few empty replies, so the paired empty-reply filter and ragged question groups are exercised too.
Data generation is timed separately; the budget (60 s on 2 cores) is for the analysis. The record's own
analysis took about 56 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from jobs.analyze_issue205.decisions import decisions
from jobs.analyze_issue205.report import report as write_report
from jobs.analyze_issue205.results import (
    Activations,
    CheckpointArtifacts,
    ConditionArtifacts,
    Config,
    behaviour_tests,
    results,
)
from shared.analysis import stats

CHECKPOINTS = ["base", "E0", "E1", "E2", "E3", "E4", "benign"]
EM_CONDITIONS = ["E0", "E1", "E2", "E3", "E4"]
INDUCTION_PERSONAS = ["assistant", "paramedic", "kindergarten_teacher", "french_person", "villain"]
COS_TO_ASSISTANT = [0.98, 0.9457, 0.9060, 0.8696, 0.7828]
PERSONAS = ["confab", "assistant", "zelthari_scholar", "kindergarten_teacher", "french_person", "villain"] + [
    f"bystander_{i}" for i in range(6)
]  # synthetic stand-ins for #184's twelve EVAL_PERSONAS (paramedic is not among them, as in the record)
METHODS = ["A", "B"]
LAYERS = [7, 14, 20, 21, 27]
HIDDEN = 3584
QUESTIONS = 240
BEHAVIOUR_QUESTIONS, COMPLETIONS = 28, 10
BUDGET_S = 60.0
RESULTS = Path(__file__).parent / "results" / "stats_bench.json"


def synthetic_activations(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per method: ``(checkpoint, persona, question, layer, hidden)`` float32, the extraction stage's layout.

    Persona centres share a common component (base cosines ~0.9); EM pulls every persona towards one
    shared direction and shrinks what tells personas apart, benign-SFT does the same more weakly. The
    question-level noise is shared by the checkpoints of a (method, layer), as real activations of the
    same prompts are strongly correlated across fine-tunes.
    """
    strength = {"base": 0.0, "benign": 0.4, **{c: 1.0 + 0.05 * i for i, c in enumerate(EM_CONDITIONS)}}
    shape = (len(CHECKPOINTS), len(PERSONAS), QUESTIONS, len(LAYERS), HIDDEN)
    data = {}
    for method in METHODS:
        values = np.empty(shape, dtype=np.float32)
        for li, _layer in enumerate(LAYERS):
            common = 3.0 * rng.standard_normal(HIDDEN, dtype=np.float32)
            specific = 0.12 * rng.standard_normal((len(PERSONAS), HIDDEN), dtype=np.float32)
            em_direction = 3.0 * rng.standard_normal(HIDDEN, dtype=np.float32)
            noise = rng.standard_normal((len(PERSONAS), QUESTIONS, HIDDEN), dtype=np.float32)
            for ci, checkpoint in enumerate(CHECKPOINTS):
                s = strength[checkpoint]
                centres = common + (1 - 0.5 * s) * specific + s * em_direction
                values[ci, :, :, li] = noise + centres[:, None]
        data[method] = values
    return data


def synthetic_empty_replies(rng: np.random.Generator, fraction: float = 0.01) -> np.ndarray:
    """``(checkpoint, persona, question)`` Method B validity: about 1 % of replies empty somewhere."""
    return rng.random((len(CHECKPOINTS), len(PERSONAS), QUESTIONS)) >= fraction / len(CHECKPOINTS)


def synthetic_leakage(rng: np.random.Generator) -> np.ndarray:
    """``(5 conditions, 12 personas, 28 questions)`` marker rates from 10 completions per cell."""
    rates = np.empty((len(EM_CONDITIONS), len(PERSONAS), BEHAVIOUR_QUESTIONS))
    for c, cos in enumerate(COS_TO_ASSISTANT):
        p = np.full((len(PERSONAS), BEHAVIOUR_QUESTIONS), 0.46 + 0.3 * (0.98 - cos))
        p[PERSONAS.index("confab")] = 0.85
        rates[c] = rng.binomial(COMPLETIONS, p) / COMPLETIONS
    return rates


def analysis_config(n_iter: int, seed: int) -> Config:
    """The stage config the workflow would pass on full (the artifact URIs are never read here)."""
    unused = "file:///nonexistent/bench"
    return Config(
        store=unused,
        run_id="bench",
        cell="analysis",
        seed=seed,
        checkpoints=[
            CheckpointArtifacts(name=name, activations_uri=unused, index_uri=unused) for name in CHECKPOINTS
        ],
        conditions=[
            ConditionArtifacts(cond=cond, persona=persona, system="default", cos_to_assistant=cos)
            for cond, persona, cos in zip(EM_CONDITIONS, INDUCTION_PERSONAS, COS_TO_ASSISTANT, strict=True)
        ],
        headline_layer=20,
        n_iter=n_iter,
        m3_contrast_iter=min(n_iter, 1_000),
    )


def run_analysis(
    values: dict[str, np.ndarray], b_valid: np.ndarray, leakage: np.ndarray, n_iter: int, seed: int
) -> tuple[dict, dict]:
    """The whole analysis; returns (timings in seconds, cell counts and headline outcomes)."""
    cfg = analysis_config(n_iter, seed)
    timings = {}
    start = time.perf_counter()
    behaviour = behaviour_tests(
        cfg, PERSONAS, leakage, [f"m{i}" for i in range(BEHAVIOUR_QUESTIONS)], COMPLETIONS
    )
    timings["behaviour_s"] = time.perf_counter() - start

    start = time.perf_counter()
    acts = Activations(CHECKPOINTS, PERSONAS, [f"q{i}" for i in range(QUESTIONS)], LAYERS, values, b_valid)
    data = results(cfg, {seed: acts}, None)
    data["per_seed"][str(seed)]["behaviour"] = behaviour
    data["decisions"] = decisions(data)
    timings["geometry_s"] = time.perf_counter() - start

    start = time.perf_counter()
    write_report(data)
    timings["report_s"] = time.perf_counter() - start

    geo = data["per_seed"][str(seed)]["geometry"]
    raw = geo["families"]["raw"]
    families = {name: len(raw[name]) for name in ("cells", "benign_vs_base", "em_vs_benign")}
    families["em_vs_base"] = families.pop("cells")
    n_h1 = behaviour["H1"]["testable"]
    outcomes = {
        "geometry_cells": families,
        "behaviour_tests": {"H1": n_h1, "H2": 1, "H3": 1},
        "n_tests": sum(families.values()) + n_h1 + 2,
        "primary_cells_firing_bh_0.01": {
            metric: sum(c["p_bh"] < 0.01 for c in raw["cells"] if c["metric"] == metric) for metric in ("M1", "M2", "M3")
        },
        "m3_accuracy_L20_A": {name: round(v, 3) for name, v in geo["values"]["A/L20"]["M3"].items()},
        "method_b_retained_min": round(min(geo["paired_retained"]["B"].values()), 4),
        "decisions_fired": data["decisions"]["per_seed"][str(seed)]["fired"],
        "behaviour": {
            **{f"H1:{c['persona']}": c["h1"] for c in behaviour["conditions"] if "h1" in c},
            "H2": {k: behaviour["H2"][k] for k in ("range", "p", "fires")},
            "H3": {k: behaviour["H3"][k] for k in ("rho", "p", "fires")},
        },
    }
    return timings, outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-iter", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 if the analysis takes over {BUDGET_S:.0f} s"
    )
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    load_before = os.getloadavg()
    start = time.perf_counter()
    values = synthetic_activations(rng)
    b_valid = synthetic_empty_replies(rng)
    leakage = synthetic_leakage(rng)
    generation_s = time.perf_counter() - start

    cpu_start, start = time.process_time(), time.perf_counter()
    timings, outcomes = run_analysis(values, b_valid, leakage, args.n_iter, args.seed)
    analysis_s = time.perf_counter() - start
    analysis_cpu_s = time.process_time() - cpu_start
    report = {
        "analysis_s": round(analysis_s, 2),
        # CPU seconds do not depend on what else runs on the machine; cores_used = CPU seconds / wall
        # shows how much of the 2 cores the analysis actually got.
        "analysis_cpu_s": round(analysis_cpu_s, 2),
        "cores_used": round(analysis_cpu_s / analysis_s, 2),
        "budget_s": BUDGET_S,
        "within_budget": analysis_s < BUDGET_S,
        "timings_s": {key: round(value, 2) for key, value in timings.items()},
        "data_generation_s": round(generation_s, 2),
        "n_iter": args.n_iter,
        "n_tests": outcomes.pop("n_tests"),
        **outcomes,
        "sizes": {
            "checkpoints": len(CHECKPOINTS),
            "methods": len(METHODS),
            "layers": len(LAYERS),
            "personas": len(PERSONAS),
            "hidden": HIDDEN,
            "questions_per_persona": QUESTIONS,
            "behaviour_questions": BEHAVIOUR_QUESTIONS,
            "completions_per_cell": COMPLETIONS,
        },
        "machine": {
            "cpus_available": stats.available_cpus(),
            "cpu_count": os.cpu_count(),
            "processor": _cpu_model(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = (
        "analysis_s",
        "analysis_cpu_s",
        "cores_used",
        "within_budget",
        "n_tests",
        "n_iter",
        "timings_s",
    )
    print(json.dumps({k: report[k] for k in summary}))
    return 1 if args.check and not report["within_budget"] else 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
