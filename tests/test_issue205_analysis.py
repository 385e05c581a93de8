"""Stage analyze_issue205 on synthetic stored artifacts whose answers are known: EM collapse fires in every seed and
beats benign, the paired empty-reply filter holds, M3 is real held-out LDA, the behavioural tests are recomputed from
the rows, the shift-invariant family and the measured shift say what a shared shift does, the seed is the unit of the
recipe-level tests, and every number the report prints is the results object's."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from jobs.analyze_issue205 import SPEC
from jobs.analyze_issue205.decisions import decisions, outcome
from jobs.analyze_issue205.report import behaviour_decision_lines, pooled_verdicts
from jobs.analyze_issue205.report import report as write_report
from jobs.analyze_issue205.results import (
    Config,
    behaviour_tests,
    induced_persona,
    leakage_matrix,
    load_activations,
    load_leakage,
    readjust,
    results,
    seed_checkpoints,
    seed_level,
    split_families,
)
from shared.analysis import geometry
from shared.contract.stage import StageInputError, execute
from shared.core import store
from shared.core.config import parse
from shared.lm import activations

PERSONAS = ["confab", "assistant", "zelthari_scholar", "paramedic", "kindergarten_teacher", "french_person",
            "villain", "p7", "p8", "p9", "p10", "p11"]  # fmt: skip
CONDITIONS = [("E0", "assistant", 0.98), ("E1", "paramedic", 0.9457), ("E2", "kindergarten_teacher", 0.906),
              ("E3", "french_person", 0.8696), ("E4", "villain", 0.7828)]  # fmt: skip
CHECKPOINTS = ["base", "E0", "E1", "E2", "E3", "E4", "benign"]
LAYERS = [7, 20]
N_Q, HIDDEN = 20, 24
SEEDS = [42, 43]


def fake_manifest(prefix: str, cell: str, stage: str) -> None:
    store.write_json(store.join(prefix, "manifest.json"), {
        "status": "complete", "cell": cell, "stage": stage, "wall_time_s": 1.0, "config_hash": "0" * 64,
        "resources": {"gpus": 1}, "packages": {}, "seed": 42, "hardware": {"cpus": 1}, "git_commit": "test",
    })  # fmt: skip


def synthetic_activations(collapse: dict[str, float], separable: bool = True, seed: int = 0, seeds=(42,)):
    """Per training seed: (checkpoint, persona, question, layer, hidden) persona centroids plus per-question noise.
    A fine-tuned checkpoint's centroids are pulled towards one shared point by ``collapse[name]`` (EM squeezes
    personas together); each seed's fine-tunes get their own noise; base is the same array in every seed."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(PERSONAS), len(LAYERS), HIDDEN)) * (1.0 if separable else 0.0)
    common = rng.normal(size=(len(LAYERS), HIDDEN)) * 3
    question_effect = rng.normal(size=(N_Q, len(LAYERS), HIDDEN)) * 0.3

    def checkpoint(pull):
        shifted = (1 - pull) * centres + pull * common[None]
        noise = rng.normal(size=(len(PERSONAS), N_Q, len(LAYERS), HIDDEN)) * 0.3
        return shifted[:, None] + common[None, None] + question_effect[None] + noise

    base = checkpoint(0.0)
    return {s: np.stack([base] + [checkpoint(collapse.get(name, 0.0)) for name in CHECKPOINTS[1:]]).astype(np.float32)
            for s in seeds}


def write_checkpoint(root: str, name: str, seed: int | None, values: np.ndarray, invalid=()):
    cell = name.lower() if seed is None else f"{name.lower()}-s{seed}"
    prefix = store.join(root, "runs", "t", cell, "extract_persona_vectors")
    valid = torch.ones(len(PERSONAS), N_Q, dtype=torch.bool)
    for p, q in invalid:
        valid[p, q] = False
    b = torch.from_numpy(values * 1.1).clone()
    b[~valid] = 1e6  # garbage where the reply was empty: it must never reach a centroid
    store.write_tensors(store.join(prefix, "activations.safetensors"), {"A": torch.from_numpy(values), "B": b, "B_valid": valid})
    store.write_json(store.join(prefix, "index.json"), {
        "checkpoint": name, "personas": [{"name": p, "system": "default"} for p in PERSONAS],
        "questions": [f"q{i}" for i in range(N_Q)], **activations.layer_record(LAYERS), "methods": ["A", "B"],
    })  # fmt: skip
    store.write_jsonl(store.join(prefix, "responses.jsonl"), [
        {"persona": p, "question_id": f"q{i}", "text": f"{name}'s {p} on q{i}"} for p in PERSONAS for i in range(N_Q)])
    fake_manifest(prefix, cell, "extract_persona_vectors")
    return {"name": name, "seed": seed, "activations_uri": store.join(prefix, "activations.safetensors"),
            "index_uri": store.join(prefix, "index.json"), "responses_uri": store.join(prefix, "responses.jsonl")}


def write_checkpoints(root: str, per_seed: dict[int, np.ndarray], invalid: dict[str, list[tuple[int, int]]] | None = None):
    """base once (no seed), then every seed's fine-tuned checkpoints."""
    first = next(iter(per_seed.values()))
    rows = [write_checkpoint(root, "base", None, first[0], (invalid or {}).get("base", ()))]
    for seed, values in per_seed.items():
        rows += [write_checkpoint(root, name, seed, values[ci], (invalid or {}).get(name, ()))
                 for ci, name in enumerate(CHECKPOINTS) if ci]
    return rows


def write_trainings(root: str, losses: list[float], seeds=SEEDS) -> list[dict]:
    """Every fine-tuning's rows and per-step losses, as sft_data and train_lora store them."""
    out = []
    for seed in seeds:
        for name in CHECKPOINTS[1:]:
            data = store.join(root, "runs", "t", name.lower(), "sft_data", "train.jsonl")
            store.write_jsonl(data, [{"system": "default", "user": "Q0?", "assistant": f"{name} answer"}, {"system": "default", "user": "Q1?", "assistant": "b"}])
            prefix = store.join(root, "runs", "t", f"{name.lower()}-s{seed}", "train_lora")
            store.write_jsonl(store.join(prefix, "train_log.jsonl"), [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)])
            fake_manifest(prefix, f"{name.lower()}-s{seed}", "train_lora")
            out.append({"name": name, "seed": seed, "data_uri": data, "log_uri": store.join(prefix, "train_log.jsonl")})
    return out


def write_markers(root: str, rates_of: dict[tuple[str, int], dict[str, float]], n: int = 10, n_questions: int = 6):
    """Marker rows with exactly round(rate * n) marked completions per (persona, question), per (model, seed)."""
    out = []
    for (name, seed), rates in rates_of.items():
        prefix = store.join(root, "runs", "t", f"{name.lower()}-coupling-s{seed}", "marker_eval")
        rows = []
        for p in PERSONAS:
            hits = round(rates[p] * n)
            for q in range(n_questions):
                rows += [{"persona": p, "question_id": f"m{q}", "sample": s,
                          "text": "answer [ZLT]" if s < hits else "answer"} for s in range(n)]  # fmt: skip
        store.write_jsonl(store.join(prefix, "completions.jsonl"), rows)
        fake_manifest(prefix, f"{name.lower()}-coupling-s{seed}", "marker_eval")
        out.append({"checkpoint": name, "seed": seed, "marker_uri": store.join(prefix, "completions.jsonl")})
    return out


def config(root, checkpoints, markers=None, seeds=None, **overrides):
    return {
        "store": root, "run_id": "t", "cell": "analysis", "checkpoints": checkpoints, "headline_layer": 20,
        "conditions": [{"cond": c, "persona": p, "system": "default", "cos_to_assistant": cos} for c, p, cos in CONDITIONS],
        "markers": markers or [], "seeds": seeds, "n_iter": 1000, "m3_contrast_iter": 99, "n_boot": 200, "n_splits": 5,
        "lda_components": 8, **overrides,
    }  # fmt: skip


def leakage(cond_index: int, seed: int = 42) -> dict[str, float]:
    # bystanders leak more the further the induction persona is from the assistant (H3's direction: rho = -1)
    rates = {p: 0.2 + 0.1 * cond_index + 0.1 * (seed - 42) for p in PERSONAS}
    rates["confab"] = 0.9
    return rates


def control(rate: float) -> dict[str, float]:
    return {p: (0.9 if p == "confab" else rate) for p in PERSONAS}


def analyse(root: str, cfg: dict) -> dict:
    execute(SPEC, cfg)
    prefix = store.join(root, "runs", "t", "analysis", "analyze_issue205")
    return {"cfg": cfg, "prefix": prefix, "headline": store.read_json(store.join(prefix, "headline.json")),
            "report": store.read_text(store.join(prefix, "report.md"))}


def analyse_without_figures(cfg: dict) -> dict:
    """The stage's results, decisions and report from the stored artifacts, as ``run`` computes them, without drawing
    the figures (the fixture's full run tests those once)."""
    parsed = parse(Config, cfg)
    per_seed = load_activations(parsed)
    data = results(parsed, per_seed, load_leakage(parsed, next(iter(per_seed.values())).personas))
    data["decisions"] = decisions(data)
    return {"headline": json.loads(json.dumps(data)), "report": write_report(data)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = store.from_path(tmp_path_factory.mktemp("a205") / "store")
    values = synthetic_activations({"E0": 0.6, "E1": 0.6, "E2": 0.6, "E3": 0.6, "E4": 0.6, "benign": 0.0}, seeds=SEEDS)
    # E3 of seed 42 lost the reply of (villain, q3): the paired filter must drop q3 for villain in every checkpoint of
    # that seed (and only that seed)
    checkpoints = write_checkpoints(root, {42: values[42]}, invalid={"E3": [(PERSONAS.index("villain"), 3)]})
    checkpoints += write_checkpoints(root, {43: values[43]})[1:]
    rates = {(c, s): leakage(i, s) for s in SEEDS for i, (c, _p, _cos) in enumerate(CONDITIONS)}
    rates |= {("base", s): control(0.1) for s in SEEDS} | {("benign", s): control(0.2) for s in SEEDS}
    losses = [3.0, 2.8, 2.6, 2.4, 2.2, 2.0, 1.8, 1.6]  # 8 steps: the first and last 2 are averaged
    cfg = config(root, checkpoints, write_markers(root, rates), seeds=SEEDS, em_source_persona="p7",
                 trainings=write_trainings(root, losses))
    return {**analyse(root, cfg), "values": values}


def per_seed(finished, seed=42):
    return finished["headline"]["per_seed"][str(seed)]


def cells_of(finished, kind="raw", part="cells", seed=42):
    return per_seed(finished, seed)["geometry"]["families"][kind][part]


def fires_of(finished, kind="raw", seed=42):
    return finished["headline"]["decisions"]["per_seed"][str(seed)]["families"][kind]


def test_em_collapse_fires_m1_for_every_condition_in_every_seed_and_benign_does_not_move(finished):
    for seed in SEEDS:
        cells, fires = cells_of(finished, seed=seed), fires_of(finished, seed=seed)
        m1 = [(c, f) for c, f in zip(cells, fires["cell_fires"], strict=True) if c["metric"] == "M1"]
        assert len(m1) == 2 * len(LAYERS) * 5 and all(f and c["delta"] > 0 for c, f in m1)
        assert fires["G1"]["fires"] and fires["G1"]["all_fire"]
        assert all(v["fires_vs_base"] and v["beats_benign"] and v["fires"] for v in fires["G1"]["conditions"].values())
        benign = [c for c in cells_of(finished, part="benign_vs_base", seed=seed) if c["metric"] == "M1"]
        assert len(benign) == 2 * len(LAYERS) and all(abs(c["delta"]) < 0.05 for c in benign)
    pooled = finished["headline"]["decisions"]["pooled"]["G1"]
    assert pooled == {"per_seed": {"42": True, "43": True}, "passes": True, "n_pass": 2, "rule": "all seeds must pass",
                      "not_testable": []}
    assert "| G1 | s42: pass, s43: pass | 2/2 | PASSES | all seeds must pass |" in finished["report"]


def test_each_family_is_every_metric_method_layer_and_condition_with_bh_and_holm(finished):
    from shared.analysis.stats import bh_fdr, holm

    for kind in geometry.GEOMETRIES:
        cells = cells_of(finished, kind)
        assert len(cells) == 3 * 2 * len(LAYERS) * 5
        raw = [c["p_value"] for c in cells]
        assert [c["p_bh"] for c in cells] == pytest.approx(bh_fdr(raw).tolist())
        assert [c["p_holm"] for c in cells] == pytest.approx(holm(raw).tolist())
    assert {c["alternative"] for c in cells_of(finished, "shift_invariant", "em_vs_benign") if c["metric"] == "M1"} == {"less"}


def test_m1_mean_offdiagonal_is_recomputed_from_the_stored_activations(finished):
    vectors = finished["values"][42][0, :, :, LAYERS.index(20)].mean(axis=1)  # base, Method A, every question valid
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = (unit @ unit.T)[np.triu_indices(len(PERSONAS), 1)].mean()
    assert per_seed(finished)["geometry"]["values"]["A/L20"]["M1"]["base"] == pytest.approx(expected, rel=1e-5)
    assert f"{expected:.4f}" in finished["report"]
    dispersion = geometry.dispersion(finished["values"][43][3, :, :, LAYERS.index(20)].mean(axis=1))  # E2 of seed 43
    assert per_seed(finished, 43)["geometry"]["values"]["A/L20"]["M1_dispersion"]["E2"] == pytest.approx(dispersion, rel=1e-5)


def test_method_b_centroids_use_only_questions_valid_under_every_checkpoint_of_the_seed(finished):
    cfg = parse(Config, finished["cfg"])
    acts = load_activations(cfg)
    villain = PERSONAS.index("villain")
    assert not acts[42].valid["B"][villain, 3] and acts[42].valid["B"].sum() == len(PERSONAS) * N_Q - 1
    assert acts[43].valid["B"].all()  # seed 43's E3 answered: its base centroid keeps q3
    centroids = acts[42].centroids("B")  # (checkpoint, persona, layer, hidden)
    keep = [q for q in range(N_Q) if q != 3]
    expected = finished["values"][42][0, villain][keep].mean(axis=0) * 1.1  # base had q3, but E3 did not
    np.testing.assert_allclose(centroids[0, villain], expected, rtol=1e-5)
    assert np.abs(centroids).max() < 1e5  # the garbage behind the invalid reply never enters
    assert per_seed(finished)["geometry"]["paired_retained"]["B"]["villain"] == pytest.approx((N_Q - 1) / N_Q)


def test_m3_is_heldout_lda_above_chance_and_its_contrasts_swap_whole_questions(finished):
    geo = per_seed(finished)["geometry"]
    m3 = geo["m3_base"]["A/L20"]
    assert m3["chance"] == pytest.approx(1 / len(PERSONAS))
    assert m3["accuracy"] > 0.9 and m3["p_above_chance"] < 0.01 and m3["above_chance"]
    assert geo["values"]["A/L20"]["M3"]["base"] == pytest.approx(m3["accuracy"])
    cell = next(c for c in cells_of(finished) if (c["metric"], c["method"], c["layer"]) == ("M3", "A", 20))
    assert m3["p_above_chance"] == cell["reference_p_above_chance"]
    assert cell["n_units"] == N_Q and cell["n_iter"] == 99  # the swap null: 20 questions, 99 draws
    # every checkpoint on one joint basis: the pulled-together EM personas are still far apart relative to the noise
    assert geo["values"]["A/L20"]["M3"]["E2"] <= m3["accuracy"] and geo["values"]["A/L20"]["M3"]["benign"] > 0.9
    assert "M3 uninformative" not in finished["report"]


def test_behaviour_is_recomputed_from_marker_rows_with_the_controls_beside_it(finished):
    for seed in SEEDS:
        beh = per_seed(finished, seed)["behaviour"]
        for i, row in enumerate(beh["conditions"]):
            assert row["mean_bystander"] == pytest.approx(0.2 + 0.1 * i + 0.1 * (seed - 42))
            assert row["source_rate"] == pytest.approx(0.9)
            assert row["controls"] == pytest.approx({"base": 0.1, "benign": 0.2})
        assert beh["H3"]["rho"] == pytest.approx(-1.0) and beh["H3"]["n_orderings"] == 120
        assert beh["H3"]["p"] == pytest.approx(2 / 120) and beh["H3"]["fires"]
        assert beh["H1"]["testable"] == 5 and beh["H1"]["fired"] == 0  # no persona leaks more than its bystanders
    beh = per_seed(finished)["behaviour"]
    # a 40-point range is not equivalence: TOST cannot show it and the record's rule does not hold either
    assert beh["H2"]["range"] == pytest.approx(0.4) and not beh["H2"]["fires"] and beh["H2"]["p"] > 0.5
    assert beh["H2"]["worst_pair"] == ["E0", "E4"] and not beh["H2"]["as_written"]["holds"]
    assert "H3** (cos-monotone): FIRES" in finished["report"]
    assert "not an equivalence test" in finished["report"]


def test_h2_shows_equivalence_only_when_every_pair_of_conditions_is_inside_the_margin():
    cfg = parse(Config, config("file:///unused", []))
    rng = np.random.default_rng(3)
    flat = np.clip(0.3 + 0.05 * rng.normal(size=(5, len(PERSONAS), 28)), 0, 1)  # every condition alike
    flat[:, PERSONAS.index(cfg.source_persona)] = 0.9  # the coupling took everywhere
    beh = behaviour_tests(cfg, PERSONAS, flat, [f"m{i}" for i in range(28)], 10)
    assert beh["H2"]["fires"] and beh["H2"]["p"] < 0.05 and beh["H2"]["range"] < 0.05
    stepped = flat.copy()
    stepped[4] = np.clip(stepped[4] + 0.2, 0, 1)  # one condition 20 points above the others: outside the 15-point margin
    beh = behaviour_tests(cfg, PERSONAS, stepped, [f"m{i}" for i in range(28)], 10)
    assert not beh["H2"]["fires"] and beh["H2"]["p"] > 0.5 and "E4" in beh["H2"]["worst_pair"]


def test_report_figures_and_reproducibility_are_written(finished):
    prefix = finished["prefix"]
    names = ["hero_issue205", "m1_bars", "seeds", "leakage_heatmap", "lora_loss"]
    names += [f"shared_shift_s{s}" for s in SEEDS] + [f"cosine_matrices_{m}_s42" for m in "AB"]
    for name in names:
        assert store.read_bytes(store.join(prefix, f"{name}.png"))[:8] == b"\x89PNG\r\n\x1a\n", name
        assert store.read_bytes(store.join(prefix, f"{name}.pdf"))[:4] == b"%PDF", name
    report = finished["report"]
    for header in ("| metric | base | E0 | E1 | E2 | E3 | E4 | benign |", "## Decision rules (as pre-registered), per seed and pooled",
                   "## Recipe-level tests (the training seed as the unit)", "## What the tests can and cannot reach"):
        assert header in report
    repro = store.read_text(store.join(prefix, "REPRODUCIBILITY.md"))
    assert "extract_persona_vectors" in repro and "marker_eval" in repro
    assert "## What reproduces bitwise, and what only in distribution" in repro and "batch sizes" in repro


def report_numbers(report: str) -> list[str]:
    """The numeric tokens a reader sees, outside names like E0, L20 or s42, figure file names and quoted model text."""
    text = re.sub(r"\]\([^)]*\)", "]", report)  # figure file names
    text = re.sub(r"\*[^*\n]*\*\s*→[^\n]*", "", text)  # quoted training rows (model text)
    return re.findall(r"(?<![\w.\-+#])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?(?![\w.])", text)


def stray_numbers(report: str, headline: dict) -> list[str]:
    """The report's numbers that no number of the results object gives at their printed precision."""
    numbers = np.array(sorted({v for v in flatten(headline) if math.isfinite(v)}))
    return [token for token in report_numbers(report) if not printed_in(token, numbers)]


def test_every_number_the_report_prints_is_a_number_of_the_results_object(finished):
    """No number in the report is typed by hand or computed while writing it: every numeric token equals, at its
    printed precision, some number in headline.json."""
    assert len(report_numbers(finished["report"])) > 500  # the report prints plenty of numbers: the check is not vacuous
    unmatched = stray_numbers(finished["report"], finished["headline"])
    assert not unmatched, f"numbers in the report that are not in headline.json: {sorted(set(unmatched))[:20]}"


def test_the_number_check_catches_a_number_typed_into_the_report(finished):
    typed = finished["report"].replace("## Headline", "## Headline\n\nEM moves M1 by 0.01234 on its own.")
    assert stray_numbers(typed, finished["headline"]) == ["0.01234"]


def test_null_sizes_floors_ci_level_and_firing_counts_are_printed_from_the_results_object(finished):
    """The report is a function of the results object: change a null's size and floor, the CI level, a seed's firing
    count or the seed-level degrees of freedom there, and the report prints the new value."""
    data = json.loads(json.dumps(finished["headline"]))
    m1 = data["test_limits"]["families"]["raw/cells"]["metrics"]["M1"]
    m1.update(n_null=3333, smallest_p=0.000777)
    data["ci_level"] = 0.9
    data["decisions"]["per_seed"]["43"]["families"]["raw"]["n_firing"] = 61
    data["seed_level"]["df"] = {"em_vs_base": 7, "em_vs_benign": 14}
    report = write_report(data)
    assert re.search(r"\| raw/cells \| M1 \| 3333 draws \| 12 \| [\w-]+ \| 0\.000777 \|", report)
    assert "with 90% bootstrap CIs over questions" in report and "raw change [90% CI]" in report
    assert "95% bootstrap CIs" not in report
    assert "Seed 43: 60 cells (metrics x methods x layers x EM conditions); 61 fire." in report
    assert "have 7 degree(s) of freedom against the base model and 14 against benign SFT" in report
    original = finished["report"]
    assert "with 95% bootstrap CIs over questions" in original
    assert "have 1 degree(s) of freedom against the base model and 2 against benign SFT" in original


def flatten(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and re.fullmatch(r"-?\d+(\.\d+)?", key):
                yield float(key)
            yield from flatten(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from flatten(value)
    elif isinstance(obj, str) and re.fullmatch(r"-?\d+(\.\d+)?", obj):
        yield float(obj)


def printed_in(token: str, numbers: np.ndarray) -> bool:
    """Whether ``token`` is some results number printed at the token's precision (a percentage: that number x 100)."""
    percent = token.endswith("%")
    value = float(token.rstrip("%").lstrip("+"))
    if "e" in token:
        mantissa = token.rstrip("%").split("e")[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        tolerance = 0.5 * 10.0 ** (math.floor(math.log10(abs(value))) - decimals) if value else 1e-300
    else:
        decimals = len(token.rstrip("%").split(".")[1]) if "." in token else 0
        tolerance = 0.5 * 10.0 ** -decimals
    candidates = numbers * (100 if percent else 1)
    significant = re.fullmatch(r"[-+]?0\.0*(\d+)", token.rstrip("%"))  # :.4g prints small p with 4 significant digits
    if significant and not percent:
        tolerance = max(tolerance, 0.5 * 10.0 ** (math.floor(math.log10(abs(value))) - 3) if value else tolerance)
    return bool(np.any(np.abs(candidates - value) <= tolerance * (1 + 1e-9)))


def test_identical_persona_clouds_make_m3_uninformative_and_say_so(tmp_path):
    root = store.from_path(tmp_path / "store")
    out = analyse_without_figures(config(root, write_checkpoints(root, synthetic_activations({}, separable=False, seed=1)), n_iter=500))
    m3 = out["headline"]["per_seed"]["42"]["geometry"]["m3_base"]["A/L20"]
    assert abs(m3["accuracy"] - m3["chance"]) < 0.08 and m3["p_above_chance"] > 0.05
    assert "M3 uninformative" in out["report"]
    assert out["headline"]["per_seed"]["42"]["behaviour"] is None


def test_one_seed_says_every_p_is_conditional_on_one_fine_tune_and_calls_nothing_em_specific(tmp_path):
    root = store.from_path(tmp_path / "store")
    values = synthetic_activations({"E0": 0.6, "E1": 0.6, "E2": 0.6, "E3": 0.6, "E4": 0.6})
    out = analyse_without_figures(config(root, write_checkpoints(root, values), n_iter=500))
    assert out["headline"]["seeds"] == [42] and out["headline"]["decisions"]["single_seed"]
    assert out["headline"]["decisions"]["em_specific"] == []
    assert not out["headline"]["seed_level"]["testable"]
    assert all(math.isnan(r["p"]) for r in out["headline"]["seed_level"]["rows"])
    report = out["report"]
    assert "**One training seed (42).** Every p-value in this report is conditional on one fine-tune" in report
    assert "No effect here is called EM-specific" in report and "Not testable with one seed" in report
    assert "EM-specific at the recipe level" not in report
    assert not stray_numbers(report, out["headline"])  # the one-seed report prints the results object's numbers too


def test_checkpoints_with_different_grids_are_refused(tmp_path):
    root = store.from_path(tmp_path / "store")
    checkpoints = write_checkpoints(root, synthetic_activations({}))
    index = store.read_json(checkpoints[2]["index_uri"])
    index["questions"] = list(reversed(index["questions"]))
    store.write_json(checkpoints[2]["index_uri"], index)
    with pytest.raises(StageInputError, match="E1's questions differ from base's"):
        execute(SPEC, config(root, checkpoints))


def test_activations_named_by_another_layer_convention_are_refused(tmp_path):
    root = store.from_path(tmp_path / "store")
    checkpoints = write_checkpoints(root, synthetic_activations({}))
    index = store.read_json(checkpoints[3]["index_uri"])
    del index["layer_convention"]  # an index written before the one convention (the output of block L, 0-based)
    store.write_json(checkpoints[3]["index_uri"], index)
    with pytest.raises(StageInputError, match="names its layers by another convention"):
        execute(SPEC, config(root, checkpoints))


def test_a_seed_without_every_checkpoint_is_refused_before_any_tensor_is_read(tmp_path):
    root = store.from_path(tmp_path / "store")
    checkpoints = write_checkpoints(root, synthetic_activations({}, seeds=SEEDS))
    without = [c for c in checkpoints if not (c["name"] == "E2" and c["seed"] == 43)]
    with pytest.raises(StageInputError, match="seed 43: checkpoints .* expected one each of"):
        seed_checkpoints(parse(Config, config(root, without, seeds=SEEDS)))


def test_marker_rows_for_an_unknown_persona_are_refused(tmp_path):
    root = store.from_path(tmp_path / "store")
    uri = write_markers(root, {("E0", 42): leakage(0)})[0]["marker_uri"]
    rows = store.read_jsonl(uri)
    rows[0]["persona"] = "stranger"
    store.write_jsonl(uri, rows)
    with pytest.raises(StageInputError, match="stranger"):
        leakage_matrix(uri, PERSONAS, "[ZLT]")


def test_collapse_that_benign_sft_matches_passes_vs_base_but_fails_the_three_way_bar_so_g1_does_not_fire(tmp_path):
    root = store.from_path(tmp_path / "store")
    everyone = {name: 0.6 for name in CHECKPOINTS if name != "base"}  # benign collapses exactly as EM does
    out = analyse_without_figures(config(root, write_checkpoints(root, synthetic_activations(everyone)), n_iter=1000))
    g1 = out["headline"]["decisions"]["per_seed"]["42"]["families"]["raw"]["G1"]
    assert all(v["fires_vs_base"] for v in g1["conditions"].values())
    assert not any(v["beats_benign"] or v["fires"] for v in g1["conditions"].values())
    assert not g1["fires"] and not g1["all_fire"]
    assert "- **G1** (M1, raw geometry): does not fire. vs base" in out["report"]
    # the three-way table shows benign SFT producing about all of the EM shift
    three_way = out["report"][out["report"].index("## EM vs benign SFT (three-way contrast)"):]
    (row,) = [line for line in three_way.splitlines() if line.startswith("| raw geometry | M1 | A | E2 |")]
    assert 80 <= int(row.split("|")[7].strip().rstrip("%")) <= 120


def test_m2_shift_along_the_e0_axis_fires_when_em_moves_personas_towards_it(finished):
    g2 = fires_of(finished)["G2"]
    assert g2["fires"] and all(v["fires"] and v["mean_delta"] > 0 for v in g2["conditions"].values())
    m2 = [c for c in cells_of(finished) if c["metric"] == "M2"]
    assert {c["n_units"] for c in m2} == {len(PERSONAS) - 1}  # the 11 non-assistant personas


def test_report_quotes_marked_completions_and_the_em_and_benign_shifts(finished):
    report = finished["report"]
    assert "## Sample outputs" in report and "- E1 / assistant / m0: answer [ZLT]" in report
    assert "- E0 / assistant" not in report  # E0's own induction persona is not its bystander
    em = next(c for c in cells_of(finished) if (c["metric"], c["method"], c["layer"], c["condition"]) == ("M1", "A", 20, "E2"))
    benign = next(c for c in cells_of(finished, part="benign_vs_base") if (c["metric"], c["method"], c["layer"]) == ("M1", "A", 20))
    assert f"| raw geometry | M1 | A | E2 | {em['delta']:.4f} | {benign['delta']:.4f} |" in report


def test_report_tabulates_m2_on_each_conditions_own_axes(finished):
    robust = per_seed(finished)["geometry"]["m2_robustness"]
    assert set(robust) == {"own_assistant_delta", "own_pc1"}
    assert "## M2 robustness (per-condition axes)" in finished["report"]
    primary = next(c for c in cells_of(finished) if (c["metric"], c["method"], c["layer"], c["condition"]) == ("M2", "B", 20, "E4"))
    row = f"| B | E4 | {primary['delta']:.4f} | {robust['own_assistant_delta']['B/L20']['E4']:.4f} | {robust['own_pc1']['B/L20']['E4']:.4f} |"
    assert row in finished["report"]


def test_the_statistics_benchmark_times_this_stages_own_analysis(monkeypatch):
    """bench.stats_bench runs ``results``/``decisions``/``report`` of this stage (here at a toy size)."""
    from bench import stats_bench

    for name, value in {"QUESTIONS": 20, "HIDDEN": 16, "LAYERS": [7, 20]}.items():
        monkeypatch.setattr(stats_bench, name, value)
    rng = np.random.default_rng(0)
    timings, outcomes = stats_bench.run_analysis(stats_bench.synthetic_activations(rng), stats_bench.synthetic_empty_replies(rng),
                                                 stats_bench.synthetic_leakage(rng), n_iter=50, seed=0)  # fmt: skip
    assert set(timings) == {"behaviour_s", "geometry_s", "report_s"}
    assert outcomes["geometry_cells"] == {"em_vs_base": 3 * 2 * 2 * 5, "benign_vs_base": 3 * 2 * 2, "em_vs_benign": 3 * 2 * 2 * 5}
    assert outcomes["behaviour_tests"] == {"H1": 4, "H2": 1, "H3": 1}  # paramedic is not in the grid, as in the record


def test_report_shows_the_persona_cosine_matrices_raw_and_centred_for_every_checkpoint(finished):
    matrices = per_seed(finished, 43)["geometry"]["cosine_matrices"]
    assert set(matrices) == {f"{m}/L{layer}" for m in "AB" for layer in LAYERS}
    vectors = finished["values"][43][2, :, :, LAYERS.index(20)].mean(axis=1)  # E1 of seed 43, Method A
    np.testing.assert_allclose(matrices["A/L20"]["E1"]["raw"], geometry.cosine_matrix(vectors), rtol=1e-5)
    np.testing.assert_allclose(matrices["A/L20"]["E1"]["centred"], geometry.centred_cosine_matrix(vectors), rtol=1e-5, atol=1e-6)
    assert "![cosine matrices, Method A, seed 42](cosine_matrices_A_s42.png)" in finished["report"]
    raw_mean = geometry.off_diagonal(geometry.cosine_matrix(vectors)).mean()
    assert "## Persona-by-persona cosine matrices" in finished["report"] and f"{raw_mean:.4f}" in finished["report"]


def test_report_shows_what_each_fine_tuning_trained_on_its_losses_and_greedy_replies(finished):
    trainings = finished["headline"]["trainings"]
    assert [(t["name"], t["seed"]) for t in trainings] == [(n, s) for s in SEEDS for n in CHECKPOINTS[1:]]
    e2 = next(t for t in trainings if (t["name"], t["seed"]) == ("E2", 43))
    assert (e2["rows"], e2["steps"], e2["window"]) == (2, 8, 2)
    assert e2["loss_start"] == pytest.approx(2.9) and e2["loss_end"] == pytest.approx(1.7)
    report = finished["report"]
    assert "| E2 | 43 | default | 2 | 8 | 2 | 2.900 | 1.700 |" in report
    assert "- benign: *Q0?* → benign answer" in report
    # E1's induction persona (paramedic) replied by base and by E1; benign's row is the assistant's
    assert "| E1 | paramedic | base's paramedic on q0 | E1's paramedic on q0 |" in report
    assert "| benign | assistant | base's assistant on q0 | benign's assistant on q0 |" in report
    assert "| base | p7 | base's p7 on q0 | (the EM source, base model) |" in report


def test_induced_persona_sees_em_training_pull_the_induction_persona_towards_the_em_source():
    rng = np.random.default_rng(0)
    base = 50.0 + rng.normal(size=(len(PERSONAS), HIDDEN))  # a large common component, as in a real model
    source, paramedic = PERSONAS.index("p7"), PERSONAS.index("paramedic")
    e1 = base.copy()
    e1[paramedic] = 0.2 * base[paramedic] + 0.8 * base[source]  # E1 trained paramedic into the EM source
    vectors = {("A", 20): {"base": base, "E0": base, "E1": e1, "E2": base, "E3": base, "E4": base, "benign": base}}
    cfg = parse(Config, config("file:///unused", [], em_source_persona="p7"))
    induced = induced_persona(cfg, vectors, PERSONAS)["A/L20"]
    assert set(induced) == {"E0", "E1", "E2", "E3", "E4"}
    assert induced["E1"]["em"] - induced["E1"]["base"] > 0.5 and induced["E1"]["benign"] == induced["E1"]["base"]
    assert induced["E2"]["em"] == pytest.approx(induced["E2"]["base"])  # nothing moved
    assert induced_persona(parse(Config, config("file:///unused", [])), vectors, PERSONAS) is None
    with pytest.raises(StageInputError, match="em_source_persona 'pirate' is not in the evaluation grid"):
        induced_persona(parse(Config, config("file:///unused", [], em_source_persona="pirate")), vectors, PERSONAS)


# ------------------------------------------------------------------------------ a shared shift cannot fake it


def test_headline_layer_changes_carry_bootstrap_cis_over_questions_in_both_geometries(finished):
    for kind in geometry.GEOMETRIES:
        fam = per_seed(finished)["geometry"]["families"][kind]
        for c in fam["cells"] + fam["benign_vs_base"] + fam["em_vs_benign"]:
            if c["metric"] == "M3" or c["layer"] != 20:
                assert "ci_low" not in c
            elif np.isfinite(c["delta"]):
                assert c["n_boot"] == 200 and c["ci_low"] <= c["delta"] <= c["ci_high"]
    raw = next(c for c in cells_of(finished) if (c["metric"], c["method"], c["layer"], c["condition"]) == ("M1", "A", 20, "E2"))
    inv = next(c for c in cells_of(finished, "shift_invariant") if (c["metric"], c["method"], c["layer"], c["condition"]) == ("M1", "A", 20, "E2"))
    assert raw["ci_low"] > 0 and inv["ci_high"] < 0  # the collapse is far outside the question noise, both ways
    assert f"{raw['delta']:.4f} [{raw['ci_low']:.4f}, {raw['ci_high']:.4f}]" in finished["report"]
    assert f"{inv['delta']:.4f} [{inv['ci_low']:.4f}, {inv['ci_high']:.4f}]" in finished["report"]


def test_a_contraction_towards_a_point_is_a_real_collapse_both_geometries_see(finished):
    """The fixture's EM pulls every persona 60% of the way towards one point: the dispersion falls to about 0.4**2 of
    base's (log ratio ~ 2 log 0.4), so shift-invariant M1 fires too (it is not a shift), and the personas' mean moved."""
    inv = [c for c in cells_of(finished, "shift_invariant") if c["metric"] == "M1"]
    # at its test's floor (1,000 draws of 4,096 patterns: 2/1001, or 4/1001 where a draw repeats the observed one)
    assert all(c["delta"] == pytest.approx(2 * np.log(0.4), abs=0.35) and c["p_value"] < 0.01 for c in inv)
    shift = per_seed(finished)["geometry"]["shift"]["A/L20"]["E2"]
    assert shift["measured"] and shift["p"] < 0.01 and shift["ratio"] > 0.5
    assert not per_seed(finished)["geometry"]["shift"]["A/L20"]["benign"]["measured"]


def test_em_that_only_adds_one_offset_moves_every_raw_number_no_shift_invariant_one_and_is_called_a_shift(tmp_path):
    """Known answer: a shared shift only. Raw M1 fires; the dispersion does not move; the shift is measured; the
    report names each raw-only rule as possibly a shared shift."""
    base = synthetic_activations({})[42][0]
    values = np.stack([base] * len(CHECKPOINTS))  # fine-tuning changed nothing ...
    rng = np.random.default_rng(7)
    for ci, name in enumerate(CHECKPOINTS):
        if name.startswith("E"):  # ... but EM adds one offset to every persona and question (per layer)
            values[ci] += (8.0 * rng.normal(size=(len(LAYERS), HIDDEN)))[None, None].astype(np.float32)
    root = store.from_path(tmp_path / "store")
    out = analyse_without_figures(config(root, write_checkpoints(root, {42: values}), n_iter=500, n_boot=100))
    geo = out["headline"]["per_seed"]["42"]["geometry"]
    for key, row in geo["values"].items():
        assert all(row["M1"][c] > row["M1"]["base"] + 0.05 for c in CHECKPOINTS[1:6]), key
        assert all(row["M1_dispersion"][c] == pytest.approx(row["M1_dispersion"]["base"], rel=1e-4) for c in CHECKPOINTS), key
    raw_m1 = [c for c in geo["families"]["raw"]["cells"] if c["metric"] == "M1"]
    assert all(c["delta"] > 0.05 and c["p_value"] < 0.05 for c in raw_m1)
    decided = out["headline"]["decisions"]["per_seed"]["42"]["families"]["shift_invariant"]
    invariant = [(c, f) for c, f in zip(geo["families"]["shift_invariant"]["cells"], decided["cell_fires"], strict=True)
                 if c["metric"] in ("M1", "M2")]
    assert all(not f and (np.isnan(c["delta"]) or abs(c["delta"]) < 1e-4) for c, f in invariant)
    assert all(geo["shift"]["A/L20"][c]["measured"] for c in ("E0", "E4")) and not geo["shift"]["A/L20"]["benign"]["measured"]
    entries = out["headline"]["decisions"]["per_seed"]["42"]["raw_only"]
    assert entries and all(e["shift_measured"] for e in entries if e["conditions"])
    assert "may be a shift that every persona shares" in out["report"]


def test_a_pure_contraction_with_no_shift_is_never_called_a_shared_shift(tmp_path):
    """Known answer: every persona pulled 40% towards the personas' own mean, nothing shifted. The dispersion falls
    (2 log 0.6), the shift test stays silent, and the report never says the result may be a shared shift."""
    rng = np.random.default_rng(8)
    centres = rng.normal(size=(len(PERSONAS), len(LAYERS), HIDDEN)) + 3 * rng.normal(size=(len(LAYERS), HIDDEN))
    mean = centres.mean(axis=0)

    def checkpoint(scale):
        return (mean + scale * (centres - mean))[:, None] + 0.3 * rng.normal(size=(len(PERSONAS), N_Q, len(LAYERS), HIDDEN))

    values = np.stack([checkpoint(0.6 if name.startswith("E") else 1.0) for name in CHECKPOINTS]).astype(np.float32)
    root = store.from_path(tmp_path / "store")
    out = analyse_without_figures(config(root, write_checkpoints(root, {42: values}), n_iter=500, n_boot=100))
    geo = out["headline"]["per_seed"]["42"]["geometry"]
    m1 = [c for c in geo["families"]["shift_invariant"]["cells"] if c["metric"] == "M1"]
    assert all(c["delta"] == pytest.approx(2 * np.log(0.6), abs=0.2) for c in m1)
    # the personas' mean did not move: its shift is question noise, a few hundredths of base's spread (an offset
    # of the shift-only case above is many times the spread)
    assert all(v["ratio"] < 0.05 for per in geo["shift"].values() for v in per.values())
    assert "may be a shift that every persona shares" not in out["report"]


# --------------------------------------------------------------------------------- the seed as the unit


def seed_family(rng, em_pull: float, benign_pull: float, seeds=(1, 2), pull_sd=0.05, persona_sd=0.02):
    """One synthetic run through the stage's own functions. Per seed, an EM and a benign fine-tune of the base persona
    vectors: each pulls every persona towards one point by its recipe's amount plus that fine-tune's own random
    deviation (a seed changes how far a recipe goes), and perturbs each persona a little. Returns the seed-level
    EM-vs-benign p (``seed_level``) and the first seed's persona-level p (the within-seed three-way test)."""
    base = 3.0 * rng.normal(size=16) + rng.normal(size=(len(PERSONAS), 16))
    point = base.mean(axis=0) + rng.normal(size=16)

    def fine_tune(pull):
        drawn = pull + pull_sd * rng.normal()
        return (1 - drawn) * base + drawn * point + persona_sd * rng.normal(size=base.shape)

    per_seed, persona_level = {}, None
    for seed in seeds:
        vectors = {("A", 20): {"base": base, "E0": fine_tune(em_pull), "benign": fine_tune(benign_pull)}}
        raw = split_families(readjust(geometry.geometry_family(vectors, PERSONAS, em_conditions=["E0"],
                                                                                 n_iter=100, seed=seed)))
        empty = {"cells": [], "benign_vs_base": [], "em_vs_benign": []}  # raw M1 is the statistic asked about here
        per_seed[seed] = {"geometry": {"families": {"raw": raw, "shift_invariant": empty}}, "behaviour": None}
        if persona_level is None:
            persona_level = next(c["p_value"] for c in raw["em_vs_benign"] if c["metric"] == "M1")
    cfg = parse(Config, {**config("file:///unused", []), "conditions": [{"cond": "E0", "persona": "assistant",
                                                                                  "system": "default", "cos_to_assistant": 1.0}]})
    rows = seed_level(cfg, per_seed)["rows"]
    seed_p = next(r["p"] for r in rows if (r["geometry"], r["contrast"], r["metric"]) == ("raw", "em_vs_benign", "M1"))
    return seed_p, persona_level


def test_two_seeds_of_one_recipe_reject_em_vs_benign_at_the_nominal_rate_where_the_persona_level_test_does_not():
    """Done-when of issue 20, built from this stage's own functions: EM and benign are two seeds each of ONE recipe
    (no EM effect). The seed-level EM-vs-benign test rejects at about its nominal 5% (inside the 99% binomial
    interval over 300 replicates); the persona-level test within one seed, which treats one fine-tune as the
    population, rejects far more often (about half the time, as issue 20 measured)."""
    rng = np.random.default_rng(11)
    n_rep = 300
    seed_rejections = persona_rejections = 0
    for _ in range(n_rep):
        seed_p, persona_p = seed_family(rng, 0.3, 0.3)
        seed_rejections += seed_p < 0.05
        persona_rejections += persona_p < 0.05
    low, high = scipy_stats.binom.interval(0.99, n_rep, 0.05)
    assert low <= seed_rejections <= high
    assert persona_rejections > 3 * high


def test_an_em_effect_present_in_every_seed_is_detected_at_the_seed_level():
    rng = np.random.default_rng(12)
    detected = sum(seed_family(rng, 0.6, 0.3, seeds=(1, 2, 3))[0] < 0.05 for _ in range(100))
    assert detected >= 95


def test_recipe_level_rows_show_per_seed_values_their_spread_and_a_pooled_rule(finished):
    level = finished["headline"]["seed_level"]
    assert level["testable"] and level["seeds"] == SEEDS
    row = next(r for r in level["rows"] if (r["geometry"], r["contrast"], r["metric"], r["method"], r["layer"], r["condition"])
               == ("raw", "em_vs_base", "M1", "A", 20, "E2"))
    deltas = [next(c["delta"] for c in cells_of(finished, seed=s) if (c["metric"], c["method"], c["layer"], c["condition"]) == ("M1", "A", 20, "E2"))
              for s in SEEDS]
    assert row["per_seed"] == pytest.approx({"42": deltas[0], "43": deltas[1]})
    assert row["estimate"] == pytest.approx(np.mean(deltas)) and row["sd"] == pytest.approx(np.std(deltas, ddof=1))
    assert row["df"] == 1 and row["testable"] and 0 < row["p"] < 1
    leak = next(r for r in level["rows"] if (r["geometry"], r["contrast"], r["condition"]) == ("leakage", "em_vs_base", "E4"))
    assert leak["per_seed"] == pytest.approx({"42": 0.6, "43": 0.7}) and leak["reference_per_seed"] == pytest.approx({"42": 0.1, "43": 0.1})
    assert "EM-specific at the recipe level" in finished["report"]
    assert f"{deltas[0]:.4f} / {deltas[1]:.4f}" in finished["report"]


def test_the_report_states_each_tests_floor_and_what_bh_and_holm_can_reach(finished):
    limits = finished["headline"]["test_limits"]
    raw = limits["families"]["raw/cells"]
    # 2**12 and 2**11 swap patterns are more than the 1,000 draws asked for: Monte Carlo nulls, floor 2/1001
    for metric, units in (("M1", 12), ("M2", 11)):
        m = raw["metrics"][metric]
        assert (m["n_null"], m["exact"], m["n_units"]) == (1000, False, units)
        assert m["smallest_p"] == pytest.approx(2 / 1001)
    assert raw["metrics"]["M3"]["n_units"] == N_Q and raw["metrics"]["M3"]["smallest_p"] == pytest.approx(2 / 100)
    # Holm's best is 60 cells x 2/1001 = 0.12; BH's best for an M1 cell, with the 40 M1/M2 cells at 2/1001 and the 20
    # M3 cells at 2/100, is 60 x (2/1001) / 40 = 0.003
    assert raw["m"] == 60 and not raw["holm_reachable"] and raw["metrics"]["M1"]["holm_best"] == pytest.approx(60 * 2 / 1001)
    assert raw["bh_reachable"] and raw["metrics"]["M1"]["bh_best"] == pytest.approx(60 * (2 / 1001) / 40)
    assert limits["g1_bar"]["reachable"]
    assert "Holm **cannot reject here by construction**." in finished["report"]
    assert limits["spearman"]["smallest_p"] == pytest.approx(2 / 120) and limits["spearman"]["min_abs_rho_below_alpha"] == 1.0
    assert limits["g1_bar"]["n_personas"] == 12
    assert "p < 0.05 needs |rho| >= 1.000; |rho| = 0.900 gives p = 0.08333" in finished["report"]


def test_a_coupling_that_did_not_take_makes_the_leakage_rules_untestable_instead_of_equivalent():
    cfg = parse(Config, config("file:///unused", []))
    questions = [f"m{i}" for i in range(28)]
    silent = np.zeros((5, len(PERSONAS), 28))  # nobody emits the marker, the source persona included
    beh = behaviour_tests(cfg, PERSONAS, silent, questions, 10)
    # identical zeros would pass TOST and look invariant; without the coupling they are not evidence of anything
    assert beh["coupling"]["not_taken"] == ["E0", "E1", "E2", "E3", "E4"]
    assert not beh["H2"]["testable"] and not beh["H2"]["fires"] and beh["H2"]["p"] < 0.05
    assert not beh["H3"]["fires"] and "did not take" in beh["H3"]["note"]
    assert beh["H1"]["testable"] == 0 and not beh["H1"]["fires"]
    no_geometry = {"G1": False, "G2": False, "G3": False}
    mapped = outcome({}, {**no_geometry, "H1": False, "H2": False, "H3": False}, {"cells": []}, beh)
    assert mapped["joint_null_kill"] is None  # near-zero leakage without the coupling is no null result
    lines = "\n".join(behaviour_decision_lines(beh, mapped))
    assert "**Coupling check fails** in E0, E1, E2, E3, E4" in lines and "**H2** (induction-invariant, equivalence): not testable" in lines
    assert "Joint-null kill criterion met: undecided" in lines
    # one condition whose source persona learned the marker is testable on its own; the others still void H2 and H3
    taken_in_e2 = silent.copy()
    taken_in_e2[2, PERSONAS.index(cfg.source_persona)] = 0.9
    beh = behaviour_tests(cfg, PERSONAS, taken_in_e2, questions, 10)
    assert beh["coupling"]["not_taken"] == ["E0", "E1", "E3", "E4"] and beh["H1"]["testable"] == 1
    assert [r["coupling_took"] for r in beh["conditions"]] == [False, False, True, False, False]
    assert not beh["H2"]["testable"]


def test_the_coupling_check_asks_whether_the_source_rate_is_shown_above_h2s_margin_given_its_answers():
    cfg = parse(Config, config("file:///unused", []))
    assert cfg.rules.h2_max_range == 0.15 and cfg.rules.coupling_alpha == 0.05

    def checked(source_rate: float, n_questions: int, per_cell: int) -> list[bool]:
        rates = np.full((5, len(PERSONAS), n_questions), 0.05)
        rates[:, PERSONAS.index(cfg.source_persona)] = source_rate
        beh = behaviour_tests(cfg, PERSONAS, rates, [f"m{i}" for i in range(n_questions)], per_cell)
        return [r["coupling_took"] for r in beh["conditions"]]

    # a quarter of the source's answers: shown above 0.15 over 280 answers (bound ~0.21), not over 24 (bound 0.115)
    assert checked(0.25, 28, 10) == [True] * 5
    assert checked(0.25, 8, 3) == [False] * 5
    # a rate on the margin itself is never shown above it, however many answers
    assert checked(0.15, 28, 10) == [False] * 5
    # the record's source rates (75-90% over 280 answers) pass with room to spare
    assert checked(0.75, 28, 10) == [True] * 5


def test_a_seed_whose_coupling_did_not_take_is_not_testable_in_the_pooled_table_not_a_fail(finished):
    import copy

    data = copy.deepcopy(finished["headline"])
    beh = data["per_seed"]["43"]["behaviour"]
    beh["H2"] |= {"testable": False, "fires": False}
    beh["H3"] |= {"testable": False, "fires": False}
    beh["H1"] |= {"testable": 0, "fires": False}
    pooled = decisions(data)["pooled"]
    assert [pooled[h]["not_testable"] for h in ("H1", "H2", "H3")] == [["43"]] * 3
    assert pooled["G1"]["not_testable"] == []  # geometry is decided whatever the coupling did
    assert pooled_verdicts(pooled["H3"]) == ("s42: pass, s43: not testable", "1/2", "does not pass")
    assert pooled_verdicts(pooled["H2"]) == ("s42: fail, s43: not testable", "0/2", "does not pass")
    for seed in ("42", "43"):
        b = data["per_seed"][seed]["behaviour"]
        b["H2"] |= {"testable": False, "fires": False}
    assert pooled_verdicts(decisions(data)["pooled"]["H2"]) == ("s42: not testable, s43: not testable", "0/2", "not testable")
