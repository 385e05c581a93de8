"""Time #205's whole pre-registered analysis at full size on synthetic data.

    python -m bench.stats_bench            # writes bench/results/stats_bench.json

Sizes follow the record: 7 checkpoints (base, E0-E4, benign-SFT) x 2 extraction methods x 5 layers x 12
personas x hidden size 3584, with 240 questions per persona for M3's held-out LDA; 28 questions x 10
completions per persona for the behavioural tests. Every test asks for n_iter = 10,000: M1/M2/M3 in all
three families (150 EM-vs-base cells, 30 benign-vs-base, 150 EM-vs-benign) and H1 (4 testable conditions),
H2, H3; M2's 2**11 sign patterns and H3's 5! orderings are fewer than that and are enumerated exactly.
M3 refits the 5-fold LDA of all 7 checkpoints under every one of its 10,000 label draws.
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

from shared import geometry, stats

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


def synthetic_activations(rng: np.random.Generator) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """Per (method, layer) and checkpoint: ``(240 * 12, 3584)`` float32 rows ordered (question, persona).

    Persona centres share a common component (base cosines ~0.9); EM pulls every persona towards one
    shared direction and shrinks what tells personas apart, benign-SFT does the same more weakly. The
    question-level noise is shared by the checkpoints of a (method, layer), as real activations of the
    same prompts are strongly correlated across fine-tunes.
    """
    strength = {"base": 0.0, "benign": 0.4, **{c: 1.0 + 0.05 * i for i, c in enumerate(EM_CONDITIONS)}}
    data = {}
    for method in METHODS:
        for layer in LAYERS:
            common = 3.0 * rng.standard_normal(HIDDEN, dtype=np.float32)
            specific = 0.12 * rng.standard_normal((len(PERSONAS), HIDDEN), dtype=np.float32)
            em_direction = 3.0 * rng.standard_normal(HIDDEN, dtype=np.float32)
            noise = rng.standard_normal((QUESTIONS * len(PERSONAS), HIDDEN), dtype=np.float32)
            data[(method, layer)] = {}
            for checkpoint in CHECKPOINTS:
                s = strength[checkpoint]
                centres = common + (1 - 0.5 * s) * specific + s * em_direction
                rows = noise.reshape(QUESTIONS, len(PERSONAS), HIDDEN) + centres[None]
                data[(method, layer)][checkpoint] = rows.reshape(-1, HIDDEN)
    return data


def synthetic_leakage(rng: np.random.Generator) -> np.ndarray:
    """``(5 conditions, 12 personas, 28 questions)`` marker rates from 10 completions per cell."""
    rates = np.empty((len(EM_CONDITIONS), len(PERSONAS), BEHAVIOUR_QUESTIONS))
    for c, cos in enumerate(COS_TO_ASSISTANT):
        p = np.full((len(PERSONAS), BEHAVIOUR_QUESTIONS), 0.46 + 0.3 * (0.98 - cos))
        p[PERSONAS.index("confab")] = 0.85
        rates[c] = rng.binomial(COMPLETIONS, p) / COMPLETIONS
    return rates


def run_analysis(activations: dict, leakage: np.ndarray, n_iter: int, seed: int) -> tuple[dict, dict]:
    """The whole analysis; returns (timings in seconds, cell counts and headline outcomes)."""
    timings = {}
    start = time.perf_counter()
    persona_vectors = {
        key: {
            name: rows.reshape(QUESTIONS, len(PERSONAS), HIDDEN).mean(axis=0)
            for name, rows in per_ckpt.items()
        }
        for key, per_ckpt in activations.items()
    }
    timings["persona_vectors_s"] = time.perf_counter() - start

    row_personas = np.tile(PERSONAS, QUESTIONS)
    row_questions = np.repeat(np.arange(QUESTIONS), len(PERSONAS))
    start = time.perf_counter()
    cells = geometry.geometry_family(
        persona_vectors,
        PERSONAS,
        em_conditions=EM_CONDITIONS,
        activations=activations,
        row_personas=row_personas,
        row_questions=row_questions,
        n_iter=n_iter,
        seed=seed,
    )
    timings["geometry_family_s"] = time.perf_counter() - start

    start = time.perf_counter()
    behaviour = []
    for c, persona in enumerate(INDUCTION_PERSONAS):
        if persona in PERSONAS:
            behaviour.append(
                stats.h1_self_leakage_test(leakage[c], PERSONAS, persona, n_iter=n_iter, rng=seed)
            )
    behaviour.append(stats.h2_invariance_test(leakage, PERSONAS, INDUCTION_PERSONAS, n_iter=n_iter, rng=seed))
    bystanders = [
        np.delete(
            leakage[c], [PERSONAS.index("confab"), *([PERSONAS.index(p)] if p in PERSONAS else [])], axis=0
        ).mean()
        for c, p in enumerate(INDUCTION_PERSONAS)
    ]
    behaviour.append(stats.h3_cos_monotone_test(COS_TO_ASSISTANT, bystanders))
    timings["behaviour_s"] = time.perf_counter() - start

    families = {}
    for cell in cells:
        families[cell.family] = families.get(cell.family, 0) + 1
    primary = [cell for cell in cells if cell.family == "em_vs_base"]
    outcomes = {
        "geometry_cells": families,
        "behaviour_tests": {test.name: sum(t.name == test.name for t in behaviour) for test in behaviour},
        "n_tests": len(cells) + len(behaviour),
        "primary_cells_firing_bh_0.01": {
            metric: sum(c.p_bh < 0.01 for c in primary if c.metric == metric) for metric in ("M1", "M2", "M3")
        },
        "m3_accuracy_L20_A": {
            c.condition: round(c.test.condition_value, 3)
            for c in cells
            if c.metric == "M3" and c.method == "A" and c.layer == 20 and c.reference == "base"
        },
        "behaviour": {
            _behaviour_key(t): {"statistic": t.statistic, "p": t.p_value, "fires": t.fires} for t in behaviour
        },
    }
    return timings, outcomes


def _behaviour_key(test: stats.HypothesisResult) -> str:
    return f"H1:{test.details['induction_persona']}" if test.name == "H1" else test.name


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
    activations = synthetic_activations(rng)
    leakage = synthetic_leakage(rng)
    generation_s = time.perf_counter() - start

    cpu_start, start = time.process_time(), time.perf_counter()
    timings, outcomes = run_analysis(activations, leakage, args.n_iter, args.seed)
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
