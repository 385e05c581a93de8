"""Stage analyze_issue205 on synthetic stored artifacts whose answers are known: EM collapse fires and beats benign,
the paired empty-reply filter holds, M3 is real held-out LDA, the behavioural tests are recomputed from the rows,
and every reported number comes from headline.json."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs import analyze_issue205 as analysis
from shared import activations, store
from shared.config import parse
from shared.stage import StageInputError, execute

PERSONAS = ["confab", "assistant", "zelthari_scholar", "paramedic", "kindergarten_teacher", "french_person",
            "villain", "p7", "p8", "p9", "p10", "p11"]  # fmt: skip
CONDITIONS = [("E0", "assistant", 0.98), ("E1", "paramedic", 0.9457), ("E2", "kindergarten_teacher", 0.906),
              ("E3", "french_person", 0.8696), ("E4", "villain", 0.7828)]  # fmt: skip
CHECKPOINTS = ["base", "E0", "E1", "E2", "E3", "E4", "benign"]
LAYERS = [7, 20]
N_Q, HIDDEN = 20, 24


def fake_manifest(prefix: str, cell: str, stage: str) -> None:
    store.write_json(store.join(prefix, "manifest.json"), {
        "status": "complete", "cell": cell, "stage": stage, "wall_time_s": 1.0, "config_hash": "0" * 64,
        "resources": {"gpus": 1}, "packages": {}, "seed": 42, "hardware": {"cpus": 1}, "git_commit": "test",
    })  # fmt: skip


def synthetic_activations(collapse: dict[str, float], separable: bool = True, seed: int = 0):
    """(checkpoint, persona, question, layer, hidden): persona centroids plus per-question noise; a checkpoint's
    centroids are pulled towards one shared direction by ``collapse[name]`` (EM squeezes personas together)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(PERSONAS), len(LAYERS), HIDDEN)) * (1.0 if separable else 0.0)
    common = rng.normal(size=(len(LAYERS), HIDDEN)) * 3
    question_effect = rng.normal(size=(N_Q, len(LAYERS), HIDDEN)) * 0.3
    out = []
    for name in CHECKPOINTS:
        pull = collapse.get(name, 0.0)
        shifted = (1 - pull) * centres + pull * common[None]
        noise = rng.normal(size=(len(PERSONAS), N_Q, len(LAYERS), HIDDEN)) * 0.3
        out.append(shifted[:, None] + common[None, None] + question_effect[None] + noise)
    return np.stack(out).astype(np.float32)


def write_checkpoints(root: str, values: np.ndarray, invalid: dict[str, list[tuple[int, int]]] | None = None):
    rows = []
    for ci, name in enumerate(CHECKPOINTS):
        prefix = store.join(root, "runs", "t", name.lower(), "extract_persona_vectors")
        valid = torch.ones(len(PERSONAS), N_Q, dtype=torch.bool)
        for p, q in (invalid or {}).get(name, []):
            valid[p, q] = False
        b = torch.from_numpy(values[ci] * 1.1).clone()
        b[~valid] = 1e6  # garbage where the reply was empty: it must never reach a centroid
        store.write_tensors(store.join(prefix, "activations.safetensors"), {"A": torch.from_numpy(values[ci]), "B": b, "B_valid": valid})
        store.write_json(store.join(prefix, "index.json"), {
            "checkpoint": name, "personas": [{"name": p, "system": "default"} for p in PERSONAS],
            "questions": [f"q{i}" for i in range(N_Q)], **activations.layer_record(LAYERS), "methods": ["A", "B"],
        })  # fmt: skip
        store.write_jsonl(store.join(prefix, "responses.jsonl"), [
            {"persona": p, "question_id": f"q{i}", "text": f"{name}'s {p} on q{i}"} for p in PERSONAS for i in range(N_Q)])
        fake_manifest(prefix, name.lower(), "extract_persona_vectors")
        rows.append({"name": name, "activations_uri": store.join(prefix, "activations.safetensors"),
                     "index_uri": store.join(prefix, "index.json"), "responses_uri": store.join(prefix, "responses.jsonl")})
    return rows


def write_trainings(root: str, losses: list[float]) -> list[dict]:
    """Every fine-tuning's rows and per-step losses, as sft_data and train_lora store them."""
    out = []
    for name in CHECKPOINTS[1:]:
        data = store.join(root, "runs", "t", name.lower(), "sft_data", "train.jsonl")
        store.write_jsonl(data, [{"system": "default", "user": "Q0?", "assistant": f"{name} answer"}, {"system": "default", "user": "Q1?", "assistant": "b"}])
        prefix = store.join(root, "runs", "t", name.lower(), "train_lora")
        store.write_jsonl(store.join(prefix, "train_log.jsonl"), [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)])
        fake_manifest(prefix, name.lower(), "train_lora")
        out.append({"name": name, "data_uri": data, "log_uri": store.join(prefix, "train_log.jsonl")})
    return out


def write_markers(root: str, rates_of: dict[str, dict[str, float]], n: int = 10, n_questions: int = 6):
    """Marker rows with exactly round(rate * n) marked completions per (persona, question)."""
    uris = {}
    for cond, rates in rates_of.items():
        prefix = store.join(root, "runs", "t", cond.lower(), "marker_eval")
        rows = []
        for p in PERSONAS:
            hits = round(rates[p] * n)
            for q in range(n_questions):
                rows += [{"persona": p, "question_id": f"m{q}", "sample": s,
                          "text": "answer [ZLT]" if s < hits else "answer"} for s in range(n)]  # fmt: skip
        store.write_jsonl(store.join(prefix, "completions.jsonl"), rows)
        fake_manifest(prefix, cond.lower(), "marker_eval")
        uris[cond] = store.join(prefix, "completions.jsonl")
    return uris


def config(root, checkpoints, markers=None, **overrides):
    return {
        "store": root, "run_id": "t", "cell": "analysis", "checkpoints": checkpoints, "headline_layer": 20,
        "conditions": [{"cond": c, "persona": p, "system": "default", "cos_to_assistant": cos,
                        "marker_uri": (markers or {}).get(c)} for c, p, cos in CONDITIONS],
        "n_iter": 2000, "n_splits": 5, "lda_components": 8, **overrides,
    }  # fmt: skip


def leakage(cond_index: int) -> dict[str, float]:
    # bystanders leak more the further the induction persona is from the assistant (H3's direction: rho = -1)
    rates = {p: 0.2 + 0.1 * cond_index for p in PERSONAS}
    rates["confab"] = 0.9
    return rates


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = store.from_path(tmp_path_factory.mktemp("a205") / "store")
    values = synthetic_activations({"E0": 0.6, "E1": 0.6, "E2": 0.6, "E3": 0.6, "E4": 0.6, "benign": 0.0})
    # E3 lost the reply of (villain, q3): the paired filter must drop q3 for villain in *every* checkpoint
    checkpoints = write_checkpoints(root, values, invalid={"E3": [(PERSONAS.index("villain"), 3)]})
    markers = write_markers(root, {c: leakage(i) for i, (c, _p, _cos) in enumerate(CONDITIONS)})
    losses = [3.0, 2.8, 2.6, 2.4, 2.2, 2.0, 1.8, 1.6]  # 8 steps: the first and last 2 are averaged
    cfg = config(root, checkpoints, markers, em_source_persona="p7", trainings=write_trainings(root, losses))
    manifest = execute(analysis.SPEC, cfg)
    prefix = store.join(root, "runs", "t", "analysis", "analyze_issue205")
    return {"cfg": cfg, "values": values, "manifest": manifest, "prefix": prefix,
            "headline": store.read_json(store.join(prefix, "headline.json")),
            "report": store.read_text(store.join(prefix, "report.md"))}  # fmt: skip


def test_em_collapse_fires_m1_for_every_condition_and_benign_does_not_move(finished):
    geo = finished["headline"]["geometry"]
    m1 = [c for c in geo["cells"] if c["metric"] == "M1"]
    assert len(m1) == 2 * len(LAYERS) * 5 and all(c["fires"] and c["delta"] > 0 for c in m1)
    assert geo["decisions"]["G1"]["fires"] and geo["decisions"]["G1"]["all_fire"]
    assert all(v["fires_vs_base"] and v["beats_benign"] and v["fires"] for v in geo["decisions"]["G1"]["conditions"].values())
    benign = [c for c in geo["benign_vs_base"] if c["metric"] == "M1"]
    assert len(benign) == 2 * len(LAYERS) and all(abs(c["delta"]) < 0.05 for c in benign)


def test_the_family_is_every_metric_method_layer_and_condition_with_bh_and_holm(finished):
    from shared.stats import bh_fdr, holm

    cells = finished["headline"]["geometry"]["cells"]
    assert len(cells) == 3 * 2 * len(LAYERS) * 5
    raw = [c["p_value"] for c in cells]
    assert [c["p_bh"] for c in cells] == pytest.approx(bh_fdr(raw).tolist())
    assert [c["p_holm"] for c in cells] == pytest.approx(holm(raw).tolist())


def test_m1_mean_offdiagonal_is_recomputed_from_the_stored_activations(finished):
    values = finished["values"]
    layer = LAYERS.index(20)
    vectors = values[0, :, :, layer].mean(axis=1)  # base, Method A, every question valid
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = unit @ unit.T
    expected = cos[np.triu_indices(len(PERSONAS), 1)].mean()
    assert finished["headline"]["geometry"]["values"]["A/L20"]["M1"]["base"] == pytest.approx(expected, rel=1e-5)
    assert f"{expected:.4f}" in finished["report"]


def test_method_b_centroids_use_only_questions_valid_under_every_checkpoint(finished):
    acts = analysis.Activations.load(parse(analysis.Config, finished["cfg"]))
    villain = PERSONAS.index("villain")
    assert not acts.valid["B"][villain, 3] and acts.valid["B"].sum() == len(PERSONAS) * N_Q - 1
    centroids = acts.centroids("B")  # (checkpoint, persona, layer, hidden)
    keep = [q for q in range(N_Q) if q != 3]
    expected = finished["values"][0, villain][keep].mean(axis=0) * 1.1  # base had q3, but E3 did not
    np.testing.assert_allclose(centroids[0, villain], expected, rtol=1e-5)
    assert np.abs(centroids).max() < 1e5  # the garbage behind the invalid reply never enters
    assert finished["headline"]["geometry"]["paired_retained"]["B"]["villain"] == pytest.approx((N_Q - 1) / N_Q)


def test_m3_is_heldout_lda_well_above_chance_on_separable_personas(finished):
    geo = finished["headline"]["geometry"]
    m3 = geo["m3_base"]["A/L20"]
    assert m3["chance"] == pytest.approx(1 / len(PERSONAS))
    assert m3["accuracy"] > 0.9 and m3["p_above_chance"] < 0.01
    assert geo["values"]["A/L20"]["M3"]["base"] == pytest.approx(m3["accuracy"])
    # the base's p above chance is the family's own (same joint-shuffle null as every M3 cell of A/L20)
    cell = next(c for c in geo["cells"] if (c["metric"], c["method"], c["layer"]) == ("M3", "A", 20))
    assert m3["p_above_chance"] == cell["reference_p_above_chance"]
    # collapse towards one direction costs the EM checkpoints separability; benign keeps it
    assert geo["values"]["A/L20"]["M3"]["E2"] < m3["accuracy"] and geo["values"]["A/L20"]["M3"]["benign"] > 0.9
    assert all(finished["headline"]["geometry"]["m3_base_above_chance"].values())
    assert "M3 uninformative" not in finished["report"]


def test_behaviour_is_recomputed_from_marker_rows(finished):
    beh = finished["headline"]["behaviour"]
    for i, row in enumerate(beh["conditions"]):
        assert row["mean_bystander"] == pytest.approx(0.2 + 0.1 * i)
        assert row["source_rate"] == pytest.approx(0.9)
        assert f"{row['mean_bystander']:.4f}" in finished["report"]
    assert beh["H3"]["rho"] == pytest.approx(-1.0) and beh["H3"]["n_orderings"] == 120
    assert beh["H3"]["p"] == pytest.approx(2 / 120) and beh["H3"]["fires"]
    assert beh["H2"]["range"] == pytest.approx(0.4) and not beh["H2"]["fires"]
    assert beh["H1"]["testable"] == 5 and beh["H1"]["fired"] == 0  # no persona leaks more than its bystanders
    assert "H3** (cos-monotone): FIRES" in finished["report"]
    assert finished["headline"]["outcome"]["fired"]["H3"] is True


def test_report_figures_and_reproducibility_are_written(finished):
    prefix = finished["prefix"]
    for name in ("hero_issue205", "m1_bars", "leakage_heatmap", "lora_loss"):
        assert store.read_bytes(store.join(prefix, f"{name}.png"))[:8] == b"\x89PNG\r\n\x1a\n"
        assert store.read_bytes(store.join(prefix, f"{name}.pdf"))[:4] == b"%PDF"
    report = finished["report"]
    for header in ("| metric | base | E0 | E1 | E2 | E3 | E4 | benign |", "## Decision rules (as pre-registered)"):
        assert header in report
    assert "extract_persona_vectors" in store.read_text(store.join(prefix, "REPRODUCIBILITY.md"))


def test_identical_persona_clouds_make_m3_uninformative_and_say_so(tmp_path):
    root = store.from_path(tmp_path / "store")
    values = synthetic_activations({}, separable=False, seed=1)
    execute(analysis.SPEC, config(root, write_checkpoints(root, values), n_iter=500))
    prefix = store.join(root, "runs", "t", "analysis", "analyze_issue205")
    headline = store.read_json(store.join(prefix, "headline.json"))
    m3 = headline["geometry"]["m3_base"]["A/L20"]
    assert abs(m3["accuracy"] - m3["chance"]) < 0.08 and m3["p_above_chance"] > 0.05
    assert "M3 uninformative" in store.read_text(store.join(prefix, "report.md"))
    assert headline["behaviour"] is None


def test_checkpoints_with_different_grids_are_refused(tmp_path):
    root = store.from_path(tmp_path / "store")
    checkpoints = write_checkpoints(root, synthetic_activations({}))
    index = store.read_json(checkpoints[2]["index_uri"])
    index["questions"] = list(reversed(index["questions"]))
    store.write_json(checkpoints[2]["index_uri"], index)
    with pytest.raises(StageInputError, match="E1's questions differ from base's"):
        execute(analysis.SPEC, config(root, checkpoints))


def test_activations_named_by_another_layer_convention_are_refused(tmp_path):
    root = store.from_path(tmp_path / "store")
    checkpoints = write_checkpoints(root, synthetic_activations({}))
    index = store.read_json(checkpoints[3]["index_uri"])
    del index["layer_convention"]  # an index written before the one convention (the output of block L, 0-based)
    store.write_json(checkpoints[3]["index_uri"], index)
    with pytest.raises(StageInputError, match="names its layers by another convention"):
        execute(analysis.SPEC, config(root, checkpoints))


def test_marker_rows_for_an_unknown_persona_are_refused(tmp_path):
    root = store.from_path(tmp_path / "store")
    uri = write_markers(root, {"E0": leakage(0)})["E0"]
    rows = store.read_jsonl(uri)
    rows[0]["persona"] = "stranger"
    store.write_jsonl(uri, rows)
    with pytest.raises(StageInputError, match="stranger"):
        analysis.leakage_matrix(uri, PERSONAS, "[ZLT]")



def test_collapse_that_benign_sft_matches_passes_vs_base_but_fails_the_three_way_bar_so_g1_does_not_fire(tmp_path):
    root = store.from_path(tmp_path / "store")
    everyone = {name: 0.6 for name in CHECKPOINTS if name != "base"}  # benign collapses exactly as EM does
    execute(analysis.SPEC, config(root, write_checkpoints(root, synthetic_activations(everyone)), n_iter=1000))
    prefix = store.join(root, "runs", "t", "analysis", "analyze_issue205")
    g1 = store.read_json(store.join(prefix, "headline.json"))["geometry"]["decisions"]["G1"]
    assert all(v["fires_vs_base"] for v in g1["conditions"].values())
    assert not any(v["beats_benign"] or v["fires"] for v in g1["conditions"].values())
    assert not g1["fires"] and not g1["all_fire"]
    report = store.read_text(store.join(prefix, "report.md"))
    assert "- **G1** (M1): does not fire. vs base" in report
    # the three-way table shows benign SFT producing about all of the EM shift
    three_way = report[report.index("## EM vs benign SFT (three-way contrast)"):]
    (row,) = [line for line in three_way.splitlines() if line.startswith("| M1 | A | E2 |")]
    assert 80 <= int(row.split("|")[6].strip().rstrip("%")) <= 120


def test_m2_shift_along_the_e0_axis_fires_when_em_moves_personas_towards_it(finished):
    g2 = finished["headline"]["geometry"]["decisions"]["G2"]
    assert g2["fires"] and all(v["fires"] and v["mean_delta"] > 0 for v in g2["conditions"].values())
    m2 = [c for c in finished["headline"]["geometry"]["cells"] if c["metric"] == "M2"]
    assert {c["n_units"] for c in m2} == {len(PERSONAS) - 1}  # the 11 non-assistant personas


def test_report_quotes_marked_completions_and_the_em_and_benign_shifts(finished):
    report = finished["report"]
    assert "## Sample outputs" in report and "- E1 / assistant / m0: answer [ZLT]" in report
    assert "- E0 / assistant" not in report  # E0's own induction persona is not its bystander
    geo = finished["headline"]["geometry"]
    em = next(c for c in geo["cells"] if (c["metric"], c["method"], c["layer"], c["condition"]) == ("M1", "A", 20, "E2"))
    benign = next(c for c in geo["benign_vs_base"] if (c["metric"], c["method"], c["layer"]) == ("M1", "A", 20))
    assert f"| M1 | A | E2 | {em['delta']:.4f} | {benign['delta']:.4f} |" in report


def test_report_tabulates_m2_on_each_conditions_own_axes(finished):
    robust = finished["headline"]["geometry"]["m2_robustness"]
    assert set(robust) == {"own_assistant_delta", "own_pc1"}
    assert "## M2 robustness (per-condition axes)" in finished["report"]
    primary = next(c for c in finished["headline"]["geometry"]["cells"]
                   if (c["metric"], c["method"], c["layer"], c["condition"]) == ("M2", "B", 20, "E4"))
    row = f"| B | E4 | {primary['delta']:.4f} | {robust['own_assistant_delta']['B/L20']['E4']:.4f} | {robust['own_pc1']['B/L20']['E4']:.4f} |"
    assert row in finished["report"]


def test_the_statistics_benchmark_times_this_stages_own_analysis(monkeypatch):
    """bench.stats_bench runs ``results``/``behaviour_tests``/``report`` of this stage (here at a toy size)."""
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
    from shared import geometry

    matrices = finished["headline"]["geometry"]["cosine_matrices"]
    assert set(matrices) == {f"{m}/L{layer}" for m in "AB" for layer in LAYERS}
    vectors = finished["values"][2, :, :, LAYERS.index(20)].mean(axis=1)  # E1, Method A, every question valid
    np.testing.assert_allclose(matrices["A/L20"]["E1"]["raw"], geometry.cosine_matrix(vectors), rtol=1e-5)
    np.testing.assert_allclose(matrices["A/L20"]["E1"]["centred"], geometry.centred_cosine_matrix(vectors), rtol=1e-5, atol=1e-6)
    for method in "AB":
        png = store.read_bytes(store.join(finished["prefix"], f"cosine_matrices_{method}.png"))
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and f"![cosine matrices, Method {method}](cosine_matrices_{method}.png)" in finished["report"]
    raw_mean = geometry.off_diagonal(geometry.cosine_matrix(vectors)).mean()
    assert "## Persona-by-persona cosine matrices" in finished["report"] and f"{raw_mean:.4f}" in finished["report"]


def test_report_shows_what_each_fine_tuning_trained_on_its_losses_and_greedy_replies(finished):
    trainings = {t["name"]: t for t in finished["headline"]["trainings"]}
    assert list(trainings) == ["E0", "E1", "E2", "E3", "E4", "benign"]
    e2 = trainings["E2"]
    assert (e2["rows"], e2["steps"], e2["window"]) == (2, 8, 2)
    assert e2["loss_start"] == pytest.approx(2.9) and e2["loss_end"] == pytest.approx(1.7)
    report = finished["report"]
    assert "| E2 | default | 2 | 8 | 2 | 2.900 | 1.700 |" in report
    assert "- benign: *Q0?* → benign answer" in report
    assert "![LoRA training loss per fine-tuning](lora_loss.png)" in report
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
    cfg = parse(analysis.Config, config("file:///unused", [], em_source_persona="p7"))
    induced = analysis.induced_persona(cfg, vectors, PERSONAS)["A/L20"]
    assert set(induced) == {"E0", "E1", "E2", "E3", "E4"}
    assert induced["E1"]["em"] - induced["E1"]["base"] > 0.5 and induced["E1"]["benign"] == induced["E1"]["base"]
    assert induced["E2"]["em"] == pytest.approx(induced["E2"]["base"])  # nothing moved
    assert analysis.induced_persona(parse(analysis.Config, config("file:///unused", [])), vectors, PERSONAS) is None
    with pytest.raises(StageInputError, match="em_source_persona 'pirate' is not in the evaluation grid"):
        analysis.induced_persona(parse(analysis.Config, config("file:///unused", [], em_source_persona="pirate")), vectors, PERSONAS)


# ------------------------------------------------------------------------------ a shared shift cannot fake it


def test_a_uniform_contraction_fires_the_raw_rules_only_and_the_report_names_each_one(finished):
    """The fixture's EM pulls every persona towards one point: a shift and a scale, which centred cosines ignore. G1
    and G2 fire on raw geometry and not on centred geometry, and the report says so rule by rule."""
    geo = finished["headline"]["geometry"]
    centred = geo["centred"]
    assert geo["decisions"]["G1"]["fires"] and geo["decisions"]["G2"]["fires"]
    assert not centred["decisions"]["G1"]["fires"] and not centred["decisions"]["G2"]["fires"]
    assert len(centred["cells"]) == len(geo["cells"])  # the same family: M1 and M2 centred, M3 as it is
    raw_m3 = [(c["p_value"], c["delta"]) for c in geo["cells"] if c["metric"] == "M3"]
    assert [(c["p_value"], c["delta"]) for c in centred["cells"] if c["metric"] == "M3"] == raw_m3
    rules = {(r["decision"], r["rule"]): r["conditions"] for r in geo["raw_not_centred"]}
    assert rules[("G1", "fires")] == [] and rules[("G1", "vs base")] == ["E0", "E1", "E2", "E3", "E4"]
    assert ("G3", "fires") not in rules
    report = finished["report"]
    assert "- **G1** (M1) fires: holds on raw geometry, not on centred geometry." in report
    assert "- **G2** (M2) vs base for E0, E1, E2, E3, E4: holds on raw geometry, not on centred geometry." in report


def test_headline_layer_changes_carry_bootstrap_cis_over_questions_and_the_report_shows_them(finished):
    geo = finished["headline"]["geometry"]
    for kind in (geo, geo["centred"]):
        for c in kind["cells"] + kind["benign_vs_base"] + kind["em_vs_benign"]:
            if c["metric"] == "M3" or c["layer"] != 20:
                assert "ci_low" not in c
            else:
                assert c["n_boot"] == 1000 and c["ci_low"] <= c["delta"] <= c["ci_high"]
    raw = next(c for c in geo["cells"] if (c["metric"], c["method"], c["layer"], c["condition"]) == ("M1", "A", 20, "E2"))
    cen = next(c for c in geo["centred"]["cells"] if (c["metric"], c["method"], c["layer"], c["condition"]) == ("M1", "A", 20, "E2"))
    assert raw["ci_low"] > 0  # the raw collapse is far outside the question noise
    row = (f"| M1 | A | E2 | {raw['delta']:.4f} [{raw['ci_low']:.4f}, {raw['ci_high']:.4f}] | {raw['p_bh']:.4f} | "
           f"{cen['delta']:.4f} [{cen['ci_low']:.4f}, {cen['ci_high']:.4f}] | {cen['p_bh']:.4f} |")
    assert row in finished["report"]
    png = store.read_bytes(store.join(finished["prefix"], "shared_shift.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "![raw vs centred](shared_shift.png)" in finished["report"]


def test_em_that_only_adds_one_offset_per_checkpoint_moves_every_raw_number_and_no_centred_one(tmp_path):
    base = synthetic_activations({})[0]
    values = np.stack([base] * len(CHECKPOINTS))  # fine-tuning changed nothing ...
    rng = np.random.default_rng(7)
    for ci, name in enumerate(CHECKPOINTS):
        if name.startswith("E"):  # ... but EM adds one offset to every persona and question (per layer)
            values[ci] += (8.0 * rng.normal(size=(len(LAYERS), HIDDEN)))[None, None].astype(np.float32)
    root = store.from_path(tmp_path / "store")
    execute(analysis.SPEC, config(root, write_checkpoints(root, values), n_iter=500, n_boot=200))
    headline = store.read_json(store.join(root, "runs", "t", "analysis", "analyze_issue205", "headline.json"))
    geo = headline["geometry"]
    for key, row in geo["values"].items():
        assert all(row["M1"][c] > row["M1"]["base"] + 0.05 for c in CHECKPOINTS[1:6]), key
        assert all(row["M1_centred"][c] == pytest.approx(row["M1_centred"]["base"], abs=1e-5) for c in CHECKPOINTS), key
    raw_m1 = [c for c in geo["cells"] if c["metric"] == "M1"]
    assert all(c["delta"] > 0.05 and c["p_value"] < 0.05 and c["ci_low"] > 0.05 for c in raw_m1 if c["layer"] == 20)
    assert all(c["delta"] > 0.05 and c["p_value"] < 0.05 for c in raw_m1)
    centred = [c for c in geo["centred"]["cells"] if c["metric"] in ("M1", "M2")]
    assert all(abs(c["delta"]) < 1e-4 and not c["fires"] for c in centred if not np.isnan(c["delta"]))
    # the assistant moved only as every persona did: the centred E0 axis is float32 rounding, next to nothing
    assert all(ratio < 0.01 for ratio in geo["centred"]["centred_axis_ratio"].values())
