"""#81's statistics against known answers on synthetic rates over the full 5 x 131 grid: a planted noun effect,
a planted trait gradient and a planted axis effect are found; a null grid shows none of them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jobs.analyze_issue81.decisions import decisions
from jobs.analyze_issue81.figures import (
    cosine_leakage_figure,
    heatmap_figure,
    hero_figure,
    interaction_figure,
    leakage_per_seed_figure,
    noun_isolation_figure,
    trait_gradation_figure,
)
from jobs.analyze_issue81.report import coherence_section, report, training_section
from jobs.analyze_issue81.results import (
    Bystander,
    Config,
    Grid,
    emission_summary,
    h3_slopes,
    head_to_head_columns,
    noun_effects,
    results,
    spearman_permutation,
    training_summary,
    trait_effects,
)
from shared.analysis.stats import ols_slope
from shared.core import store
from workflows import issue81

SOURCES = [{"name": s["name"], "noun": s["noun"]} for s in issue81.persona_table()["sources"]]
GRID = issue81.bystander_grid()
N_QUESTIONS, N_PER_QUESTION = 20, 10  # the record's 20 questions x 10 completions: 200 per cell


def write_cell(root: str, label: str, rate_of, rng, incoherent: set[str] = frozenset(), *, source: str | None = None,
               seed: int | None = None, abstaining_judge: bool = False) -> dict:
    """One evaluated model's stored counts: every bystander's hits per question drawn from ``rate_of(label, b)``."""
    rates = {}
    for b in GRID:
        per_question = rng.binomial(N_PER_QUESTION, rate_of(label, b), size=N_QUESTIONS)
        hits = int(per_question.sum())
        rates[b["id"]] = {"hits": hits, "total": N_QUESTIONS * N_PER_QUESTION, "rate": hits / (N_QUESTIONS * N_PER_QUESTION),
                          "questions": {f"q{i:02d}": {"hits": int(h), "total": N_PER_QUESTION}
                                        for i, h in enumerate(per_question)}}
    rates_uri = store.join(root, label, "marker_rates.json")
    store.write_json(rates_uri, {"rates": rates, "matching": "synthetic"})
    scores_uri = store.join(root, label, "scores.jsonl")
    store.write_jsonl(scores_uri, [{"condition": b["id"], "question_id": f"{b['id']}/q0", "sample": 0,
                                    "score": None if abstaining_judge else 10.0 if b["id"] in incoherent else 90.0,
                                    "error": "abstained" if abstaining_judge else None} for b in GRID])
    return {"label": label, "source": source, "seed": seed, "rates_uri": rates_uri, "coherence_uri": scores_uri}


def analyse_synthetic(tmp_path, rate_of, *, seed=0, incoherent=None, n_perm=2000, centroids=None, base_rate_of=None,
                      seeds=(42,), full=False, abstaining_judge=False) -> dict:
    """The analysis on synthetic counts: ``rate_of(label, bystander)`` per model, where a source's label is its name
    (one seed) or ``<name>-s<seed>``. ``full`` also takes the decisions (the results object the report prints)."""
    root = store.from_path(tmp_path / "synthetic")
    rng = np.random.default_rng(seed)
    incoherent = incoherent or {}
    cells = []
    for s in SOURCES:
        for training_seed in seeds:
            label = s["name"] if len(seeds) == 1 else f"{s['name']}-s{training_seed}"
            cells.append(write_cell(root, label, rate_of, rng, incoherent.get(label, set()), source=s["name"],
                                    seed=training_seed, abstaining_judge=abstaining_judge))
    cells.append(write_cell(root, "base", base_rate_of or (lambda label, b: 0.0), rng, abstaining_judge=abstaining_judge))
    geometry = {}
    if centroids is not None:
        geometry = {"centroids_uri": store.join(root, "centroids.npz"), "centroid_personas_uri": store.join(root, "ids.json")}
        store.write_npz(geometry["centroids_uri"], centroids=centroids[None], layers=[20])
        store.write_json(geometry["centroid_personas_uri"], {"persona_ids": [b["id"] for b in GRID]})
    cfg = Config(store=root, run_id="t", cell="analysis", sources=SOURCES, seeds=list(seeds),
                   bystanders=[{k: b[k] for k in ("id", "kind", "noun", "trait", "level")} for b in GRID],
                   cells=cells, n_boot=1000, n_perm=n_perm, headline_layer=20, **geometry)
    res = results(cfg)
    if full:
        res["decisions"] = decisions(res)
    return res


def one_seed(result: dict, key: str) -> dict:
    """``result[key]`` of the run's only seed (per source where the section is per source)."""
    (seed,) = result["seeds"]
    section = result[key]["per_source"] if "per_source" in result[key] else result[key]
    return {name: by_seed[str(seed)] for name, by_seed in section.items()}


def source_noun(label: str) -> str | None:
    """The noun of the source a model label belongs to (``chef`` or ``chef-s43``); None for the base model."""
    return next((s["noun"] for s in SOURCES if s["name"] == label.split("-s")[0]), None)


def planted_noun(label, b):
    return 0.7 if b["noun"] is not None and b["noun"] == source_noun(label) else 0.1


def null_grid(label, b):
    return 0.0 if label == "base" else 0.2


def planted_agreeableness_gradient(label, b):
    if label == "base":
        return 0.0
    if b["trait"] == "Agreeableness":
        return 0.1 + 0.15 * (int(b["level"][1]) - 1)
    return 0.1


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return analyse_synthetic(tmp_path_factory.mktemp("noun"), planted_noun, full=True)


@pytest.fixture(scope="module")
def null(tmp_path_factory):
    return analyse_synthetic(tmp_path_factory.mktemp("null"), null_grid, full=True)


@pytest.fixture(scope="module")
def gradient(tmp_path_factory):
    return analyse_synthetic(tmp_path_factory.mktemp("gradient"), planted_agreeableness_gradient)


def test_a_planted_noun_effect_is_found_for_every_source(planted):
    assert planted["decisions"]["h2"]["n_pass_pooled"] == 5
    for source in one_seed(planted, "h2").values():
        assert source["median_noun_effect"] == pytest.approx(0.6, abs=0.08)
        assert source["median_trait_effect"] < 0.06
        assert source["n_noun_cells"] == 25 and source["n_trait_cells"] == 125
    test = planted["h2"]["noun_match_test"]["42"]
    assert test["p_value"] < 0.001
    assert test["statistic"] == pytest.approx(0.6, abs=0.03)


def test_a_null_grid_shows_no_noun_effect(null):
    assert null["h2"]["noun_match_test"]["42"]["p_value"] > 0.05
    for source in one_seed(null, "h2").values():
        assert 0.5 < source["ratio"] < 2.0  # the two medians measure the same sampling noise


def test_h1_implantation_uses_the_sources_own_pure_noun_bystander(planted, null):
    for name, row in one_seed(planted, "h1").items():
        assert row["bystander"] == f"A2__{source_noun(name)}"
        assert row["hits"] / row["total"] == row["rate"]
    assert planted["decisions"]["h1"]["n_pass_pooled"] == 0  # 0.7 is below the record's 0.80 bar
    assert null["decisions"]["h1"]["n_pass_pooled"] == 0


def test_h3_counts_the_planted_gradient_and_little_else(gradient, null):
    family = gradient["h3"]["per_seed"]["42"]
    assert family["n_triples"] == 125
    agree = gradient["axes"]["traits"].index("Agreeableness")
    for source in family["per_source"].values():
        above = np.abs(np.array(source["slope"], dtype=float)) > np.array(source["half_width"], dtype=float)
        assert above[:, agree].all()  # every noun's Agreeableness slope (0.15 per level)
        assert above.sum() <= 5 + 3  # the other 20 triples per source are mostly null
        assert np.array(source["slope"], dtype=float)[:, agree] == pytest.approx(0.15, abs=0.03)
        assert (np.array(source["p_bh"], dtype=float)[:, agree] < 0.05).all()
    # BH finds the 25 planted slopes and at most a few others; raw counting adds about alpha x the 100 null triples
    assert 25 <= family["n_bh"] <= 28
    assert family["expected_false_raw"] == pytest.approx(0.05 * 125)
    assert null["h3"]["per_seed"]["42"]["n_bh"] <= 3
    assert null["h3"]["per_seed"]["42"]["n_above_half_width"] <= 0.15 * 125


def test_h3_slopes_are_of_the_base_subtracted_rate(tmp_path):
    """A gradient the base model shows just as much as every source is not a gradient of leakage."""

    def gradient_everywhere(label, b):
        return 0.1 + 0.15 * (int(b["level"][1]) - 1) if b["trait"] == "Agreeableness" else 0.1

    h3 = analyse_synthetic(tmp_path, gradient_everywhere, base_rate_of=gradient_everywhere, n_perm=200)["h3"]["per_seed"]["42"]
    assert h3["n_triples"] == 125
    assert h3["n_above_half_width"] <= 0.15 * h3["n_triples"] and h3["n_bh"] <= 3
    for source in h3["per_source"].values():
        assert np.array(source["slope"], dtype=float) == pytest.approx(0.0, abs=0.06)


def test_h3_intervals_widen_with_the_base_models_noise_on_the_same_questions():
    rng = np.random.default_rng(0)
    totals = np.full((1, 20, 5), 10.0)  # 20 questions x 5 levels, 10 completions each
    hits = rng.binomial(10, np.linspace(0.1, 0.5, 5), size=(1, 20, 5)).astype(float)
    base = rng.binomial(10, 0.5, size=(1, 20, 5)).astype(float)
    alone = h3_slopes(hits, totals, n_boot=1000, n_perm=500, seed=0)
    noisy_base = h3_slopes(hits, totals, base, totals, n_boot=1000, n_perm=500, seed=0)
    pooled = hits.sum(axis=1) / 200
    assert alone["slope"][0] == pytest.approx(ols_slope(np.arange(1, 6), pooled[0]))
    assert noisy_base["slope"][0] == pytest.approx(ols_slope(np.arange(1, 6), pooled[0] - base.sum(axis=1)[0] / 200))
    assert noisy_base["half_width"][0] > 1.2 * alone["half_width"][0]
    assert alone["low"][0] < alone["slope"][0] < alone["high"][0] and alone["p_value"][0] < 0.01


def test_h3_leaves_a_triple_with_an_empty_cell_out():
    totals = np.full((2, 4, 5), 10.0)
    totals[1, 2, 3] = 0.0
    result = h3_slopes(np.zeros((2, 4, 5)), totals, n_boot=200, n_perm=200, seed=0)
    assert np.isfinite(result["slope"][0]) and np.isnan(result["slope"][1]) and np.isnan(result["p_value"][1])


def test_the_axis_permutation_test_finds_a_planted_axis_and_not_a_null_one(gradient, null):
    assert gradient["axis_permutation_leak"]["42"]["p_value"] < 0.01
    top = max(gradient["head_to_head"], key=lambda t: gradient["head_to_head"][t]["adjective_leak"])
    assert top == "Agreeableness"
    assert null["axis_permutation_leak"]["42"]["p_value"] > 0.05


def test_base_rates_are_subtracted(tmp_path):
    shifted = analyse_synthetic(tmp_path, lambda label, b: 0.3, n_perm=200)  # base writes 0.0 for every cell
    row = shifted["base_subtracted"]["chef"]
    rates = shifted["rates"]
    assert all(row[b] == pytest.approx(rates["chef"][b] - rates["base"][b]) for b in row)


def test_incoherent_cells_are_flagged_and_left_out_of_h2(tmp_path):
    drop = {f"A1__{noun}__Openness__L1" for noun in issue81.persona_table()["nouns"]}
    result = analyse_synthetic(tmp_path, planted_noun, incoherent={"chef": drop}, n_perm=200)
    assert set(result["coherence"]["flagged"]["chef"]) == drop
    assert result["coherence"]["cell_mean"]["chef"]["A1__chef__Openness__L1"] == 10.0
    h2 = one_seed(result, "h2")
    assert h2["chef"]["n_noun_cells"] == 24 and h2["chef"]["n_trait_cells"] == 120
    assert h2["pirate"]["n_noun_cells"] == 25


def test_figures_mark_exactly_the_low_coherence_cells(tmp_path):
    drop = {"chef": {"A1__robot__Openness__L1", "A1__chef__Neuroticism__L5", "A2__pirate"},
            "robot": {"A1__chef__Openness__L2"}}
    result = analyse_synthetic(tmp_path, planted_noun, incoherent=drop, n_perm=200)
    out = store.from_path(tmp_path / "figures")
    assert heatmap_figure(result, store.join(out, "heatmap"))["marked"] == 4
    assert hero_figure(result, store.join(out, "hero"))["marked"] == 1  # the one pure-noun cell
    assert noun_isolation_figure(result, store.join(out, "nouns"))["marked"] == 3  # the three A1 cells
    assert trait_gradation_figure(result, store.join(out, "traits"))["marked"] == 3
    # chef's own-noun cell (Neuroticism, L5) leaves its noun effect uncomputable; a flagged other-noun cell does not
    assert interaction_figure(result, store.join(out, "interaction"))["marked"] == 1


def test_spearman_permutation_knows_a_monotone_relation_from_noise():
    x = np.arange(20, dtype=float)
    assert spearman_permutation(x, x**2, n_perm=2000, seed=0)["rho"] == pytest.approx(1.0)
    assert spearman_permutation(x, x**2, n_perm=2000, seed=0)["p_value"] < 0.001
    noise = np.random.default_rng(5).normal(size=20)
    assert spearman_permutation(x, noise, n_perm=2000, seed=0)["p_value"] > 0.05
    assert spearman_permutation(x[:2], x[:2], n_perm=10, seed=0)["rho"] is None


def test_noun_and_trait_effects_follow_the_pinned_medians():
    cube = np.zeros((3, 2, 2))
    cube[0] = [[0.9, 0.9], [0.9, 0.1]]  # source noun 0
    cube[1] = [[0.1, 0.1], [0.1, 0.1]]
    cube[2] = [[0.5, 0.5], [0.5, 0.5]]
    noun = noun_effects(cube, 0)
    assert noun[0, 0] == pytest.approx(np.median([0.8, 0.4]))
    assert noun[1, 1] == pytest.approx(np.median([0.0, 0.4]))
    trait = trait_effects(cube)
    assert trait[0, 1, 1] == pytest.approx(0.8)  # |0.1 - 0.9| against all three other anchors
    assert trait[0, 0, 0] == pytest.approx(0.0)  # median of {0, 0, 0.8}


NOUN_ANGLE = {"person": 0.0, "chef": 0.25, "pirate": 0.6, "child": 1.0, "robot": 1.5}


def planted_geometry() -> np.ndarray:
    """Nouns on a circle (cosine falls with the angle between them); Agreeableness descriptors pull a persona far
    along its own direction, the other traits only a little."""
    traits = issue81.descriptors()["traits"]
    vectors = []
    for b in GRID:
        v = np.zeros(16)
        if b["noun"] is not None:
            v[0], v[1] = np.cos(NOUN_ANGLE[b["noun"]]), np.sin(NOUN_ANGLE[b["noun"]])
        else:
            v[2] = 1.0
        if b["trait"] is not None:
            v[3 + traits.index(b["trait"])] = 1.5 if b["trait"] == "Agreeableness" else 0.3
        vectors.append(v)
    return np.array(vectors)


def leak_follows_cosine(label, b):
    if label == "base" or b["noun"] is None:
        return 0.0
    return 0.9 * max(0.0, np.cos(NOUN_ANGLE[b["noun"]] - NOUN_ANGLE[source_noun(label)]))


def test_h4_finds_leakage_that_follows_base_model_cosine(tmp_path):
    result = analyse_synthetic(tmp_path, leak_follows_cosine, centroids=planted_geometry(), n_perm=2000)
    h4 = result["geometry"]["h4"]
    assert h4["nouns"] == ["person", "chef", "pirate", "child", "robot"]
    assert np.diag(np.array(h4["cos"])) == pytest.approx(1.0)
    off = h4["off_diagonal"]
    assert off["n"] == 20 and off["rho"] > 0.8 and off["p_value"] < 0.01
    assert h4["per_layer_off_diagonal"]["20"] == off  # one test, one p-value, wherever the report prints it


def test_the_cosine_axis_test_finds_the_axis_that_moves_personas_most(tmp_path):
    result = analyse_synthetic(tmp_path, null_grid, centroids=planted_geometry(), n_perm=2000)
    geometry = result["geometry"]
    assert geometry["axis_permutation_cos"]["p_value"] < 0.01
    top = max(result["head_to_head"], key=lambda t: result["head_to_head"][t]["adjective_cos"])
    assert top == "Agreeableness"
    assert all(row["noun_swap_cos"] > 0 for row in result["head_to_head"].values())
    # cosine to each source, as the record counts it: 5 sources x 5 nouns x 5 levels cells, 5 x 5 contexts
    assert geometry["axis_permutation_cos"]["n_rows"] == 625
    for row in result["head_to_head"].values():
        assert (row["n_adjective_cos"], row["n_noun_swap_contexts_cos"]) == (125, 25)
        assert (row["n_adjective_leak"], row["n_noun_swap_contexts_leak"]) == (125, 25)


def test_the_cosine_head_to_head_is_measured_against_each_source():
    """Hand-built geometry: 2 nouns, 1 trait, 2 levels. Each source's A1 cells sit at a known cosine to it."""
    bystanders = [Bystander(id=f"A1__{n}__T__{lv}", kind="A1", noun=n, trait="T", level=lv)
                  for n in ("a", "b") for lv in ("L1", "L2")]
    bystanders += [Bystander(id=f"A2__{n}", kind="A2", noun=n) for n in ("a", "b")]
    grid = Grid(bystanders)
    # cos(source a, .) and cos(source b, .) per A1 cell [noun, trait, level] and per A2 noun
    to_a = (np.array([[[0.8, 0.6]], [[0.5, 0.5]]]), np.array([1.0, 0.7]))
    to_b = (np.array([[[0.4, 0.4]], [[0.9, 0.7]]]), np.array([0.7, 1.0]))
    table = {"T": {}}
    head_to_head_columns(grid, [to_a, to_b], "cos", table, n_perm=100, seed=0)
    adjective = np.mean([0.2, 0.4, 0.2, 0.2, 0.3, 0.3, 0.1, 0.3])
    noun_swap = np.mean([0.3, 0.1, 0.5, 0.3])
    assert table["T"]["adjective_cos"] == pytest.approx(adjective)
    assert table["T"]["noun_swap_cos"] == pytest.approx(noun_swap)
    assert table["T"]["ratio_cos"] == pytest.approx(adjective / noun_swap)
    assert (table["T"]["n_adjective_cos"], table["T"]["n_noun_swap_contexts_cos"]) == (8, 4)


def test_the_analysis_refuses_a_run_without_the_base_model_a_source_or_a_seed(tmp_path):
    from shared.contract.stage import StageInputError

    root = store.from_path(tmp_path / "inputs")
    rng = np.random.default_rng(0)
    cells = [write_cell(root, s["name"], planted_noun, rng) for s in SOURCES]
    bystanders = [{k: b[k] for k in ("id", "kind", "noun", "trait", "level")} for b in GRID]

    def config(cells, **extra):
        return Config(store=root, run_id="t", cell="analysis", sources=SOURCES, bystanders=bystanders, cells=cells,
                        **extra)

    with pytest.raises(StageInputError, match="no base-model cell 'base'"):
        results(config(cells))
    base = write_cell(root, "base", null_grid, rng)
    with pytest.raises(StageInputError, match=r"no evaluation for source\(s\) \['robot'\]"):
        results(config([*cells[:-1], base]))
    second = write_cell(root, "chef-s43", planted_noun, rng, source="chef", seed=43)
    with pytest.raises(StageInputError, match="every source needs every training seed"):
        results(config([*cells, second, base]))


def test_counts_without_questions_are_refused_with_one_line(tmp_path):
    """An evaluation stored before per-question counts existed cannot give question-clustered intervals."""
    from shared.contract.stage import StageInputError

    root = store.from_path(tmp_path / "old")
    rng = np.random.default_rng(0)
    cells = [write_cell(root, s["name"], planted_noun, rng) for s in SOURCES]
    base = write_cell(root, "base", null_grid, rng)
    stored = store.read_json(base["rates_uri"])
    for cell in stored["rates"].values():
        del cell["questions"]
    store.write_json(base["rates_uri"], stored)
    cfg = Config(store=root, run_id="t", cell="analysis", sources=SOURCES, cells=[*cells, base],
                   bystanders=[{k: b[k] for k in ("id", "kind", "noun", "trait", "level")} for b in GRID])
    with pytest.raises(StageInputError, match="no per-question counts") as err:
        results(cfg)
    assert "\n" not in str(err.value)


def test_the_cosine_figure_draws_every_bystander_and_marks_the_low_coherence_ones(tmp_path):
    drop = {"chef": {"A1__robot__Openness__L1", "A2__pirate", "assistant"}, "robot": {"A1__chef__Openness__L2"}}
    result = analyse_synthetic(tmp_path, leak_follows_cosine, centroids=planted_geometry(), incoherent=drop, n_perm=200)
    cos = result["geometry"]["cos_to_source"]
    assert all(set(cos[s["name"]]) == set(result["bystander_ids"]) for s in SOURCES)  # every bystander has an x
    assert cos["chef"]["A2__chef"] == pytest.approx(1.0)  # the source's own prompt
    drawn = cosine_leakage_figure(result, store.join(store.from_path(tmp_path / "figures"), "cosine"))
    assert drawn["marked"] == 4
    assert store.read_bytes(drawn["png"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_emission_summary_separates_the_sources_own_bystander_from_the_rest():
    rates = {"A2__chef": 0.9, "A2__robot": 0.3, "assistant": 0.1}
    hits, totals = {"A2__chef": 9, "A2__robot": 3, "assistant": 1}, {"A2__chef": 10, "A2__robot": 10, "assistant": 10}
    truncated = {"A2__chef": 1, "A2__robot": 2, "assistant": 3}
    summary = emission_summary(rates, hits, totals, truncated, own="A2__chef")
    assert summary["own_rate"] == 0.9 and summary["n_others"] == 2
    assert summary["mean_rate_others"] == pytest.approx(0.2)
    assert (summary["max_other"], summary["max_other_rate"]) == ("A2__robot", 0.3)
    assert summary["pooled_rate"] == pytest.approx(13 / 30) and summary["truncated_share"] == pytest.approx(6 / 30)
    base = emission_summary(rates, hits, totals, {**truncated, "assistant": None}, own=None)
    assert base["own_rate"] is None and base["n_others"] == 3 and base["truncated_share"] is None


def test_the_lora_training_section_summarises_each_sources_stored_losses(tmp_path):
    root = store.from_path(tmp_path / "training")
    log = store.join(root, "pirate", "train_log.jsonl")
    store.write_jsonl(log, [{"step": i + 1, "loss": loss} for i, loss in enumerate([4.0, 3.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5])])
    cells = [{"label": "pirate", "rates_uri": store.join(root, "pirate", "marker_rates.json"), "train_log_uri": log},
             {"label": "base", "rates_uri": store.join(root, "base", "marker_rates.json")}]
    cfg = Config(store=root, run_id="t", cell="analysis", sources=SOURCES[:1], bystanders=[{k: GRID[0][k] for k in ("id", "kind", "noun", "trait", "level")}], cells=cells)
    # 8 steps: a window of 8 // 4 = 2 steps at each end
    assert training_summary(cfg) == {"pirate": {"steps": 8, "window": 2, "loss_start": 3.5, "loss_end": 0.5}}
    section = "\n".join(training_section(training_summary(cfg)))
    assert "| pirate | 8 | 2 | 3.500 | 0.500 |" in section and "](lora_loss.png)" in section
    assert training_section({}) == []


# ---------------------------------------------------------------------------------------------------------------
# training seeds: per-seed values, between-seed intervals, pooled decisions, and a report that says what it rests on

SEEDS = (42, 43)


def seed_dependent(label, b):
    """chef implants its marker in seed 42 (0.95) but not in seed 43 (0.5); every source leaks 0.2 elsewhere in seed
    42 and 0.3 in seed 43; pirate implants in both seeds."""
    if label == "base":
        return 0.0
    source, seed = label.split("-s")
    if b["noun"] is not None and b["noun"] == source_noun(label) and b["kind"] == "A2":
        return 0.5 if (source, seed) == ("chef", "43") else 0.95
    return 0.2 if seed == "42" else 0.3


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    return analyse_synthetic(tmp_path_factory.mktemp("seeds"), seed_dependent, seeds=SEEDS, n_perm=500, full=True,
                             centroids=planted_geometry(), incoherent={"chef-s42": {"A1__robot__Openness__L1"}})


def test_each_seed_has_its_own_leakage_and_the_seeds_give_the_interval(two_seeds):
    pirate = two_seeds["leakage"]["pirate"]
    for seed, planted_rate in (("42", 0.2), ("43", 0.3)):
        others = pirate["per_seed"][seed]["others"]
        assert others["estimate"] == pytest.approx(planted_rate, abs=0.02)
        assert others["low"] < others["estimate"] < others["high"]
    between = pirate["between_seeds"]["others"]
    per_seed = [pirate["per_seed"][seed]["others"]["estimate"] for seed in ("42", "43")]
    assert between["mean"] == pytest.approx(np.mean(per_seed))
    assert between["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert between["n_seeds"] == 2 and between["low"] < between["mean"] < between["high"]
    # two seeds that disagree by 10 points give a t interval (1 degree of freedom) far wider than either seed's
    assert between["high"] - between["low"] > 5 * (others["high"] - others["low"])


def test_a_rule_passes_pooled_only_when_every_seed_passes(two_seeds):
    h1 = two_seeds["decisions"]["h1"]
    assert h1["per_source"]["chef"]["per_seed"] == {"42": True, "43": False}
    assert not h1["per_source"]["chef"]["passes"]
    assert h1["per_source"]["pirate"]["per_seed"] == {"42": True, "43": True} and h1["per_source"]["pirate"]["passes"]
    assert h1["n_pass_per_seed"] == {"42": 5, "43": 4} and h1["n_pass_pooled"] == 4
    assert two_seeds["decisions"]["rule"] == "all seeds must pass"


def test_a_slope_must_be_found_in_every_seed_to_count_pooled(tmp_path):
    def gradient_in_seed_42_only(label, b):
        if label == "base":
            return 0.0
        if label.endswith("-s42") and b["trait"] == "Agreeableness":
            return 0.1 + 0.15 * (int(b["level"][1]) - 1)
        return 0.1

    result = analyse_synthetic(tmp_path, gradient_in_seed_42_only, seeds=SEEDS, n_perm=500, full=True)
    per_seed = result["h3"]["per_seed"]
    assert per_seed["42"]["n_bh"] >= 25 and per_seed["43"]["n_bh"] <= 3
    assert result["decisions"]["h3"]["n_bh_in_every_seed"] <= 3
    assert result["h3"]["between_seeds"]["df"] == 1


def report_numbers(text: str) -> list[str]:
    """Every number printed in the report, outside identifiers (A2__chef, L5, H1, chef-s43, Big-5, #81)."""
    return re.findall(r"(?<![\w.#\-])-?\d+(?:\.\d+)?(?![\w.]*\w)", text)


def renderings(results: dict) -> set[str]:
    """Every way the report may print a number of the results object: as itself, rounded, or in percent."""
    out: set[str] = set()

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            if float(value).is_integer():
                out.add(str(int(value)))
            for digits in range(5):
                out.add(f"{value:.{digits}f}")
                out.add(f"{100 * value:.{digits}f}")
            out.add(f"{value:g}")

    walk(results)
    return out | {f"-{r}" for r in out if r.strip("0.") == ""}  # "-0.0": a negative value that rounds to zero


@pytest.fixture(scope="module")
def one_seed_with_geometry(tmp_path_factory):
    return analyse_synthetic(tmp_path_factory.mktemp("one"), planted_noun, n_perm=200, full=True,
                             centroids=planted_geometry(), incoherent={"chef": {"A1__robot__Openness__L1"}})


@pytest.mark.parametrize("run", ["one_seed_with_geometry", "two_seeds"])
def test_every_number_in_the_report_is_the_results_objects(tmp_path, request, run):
    result = request.getfixturevalue(run)
    # one figure drawn for real (the report prints each figure's count of marked cells); the others are drawn
    # by the figure tests
    drawn = leakage_per_seed_figure(result, store.join(store.from_path(tmp_path), "leakage_per_seed"))
    result["figures"] = {"leakage_per_seed": {"png": drawn["png"], "pdf": drawn["pdf"],
                                              "low_coherence_marked": drawn["marked"]}}
    text = report(result)
    printed = report_numbers(text)
    assert len(printed) > 300  # the check below reads a real report, not an empty one
    known = renderings(result)
    strangers = sorted({n for n in printed if n not in known})
    assert not strangers, f"numbers in the report that the results object does not hold: {strangers[:20]}"
    # and a number typed into the report by hand is caught
    assert report_numbers(text + " a hand-typed 0.123456")[-1] not in known


def test_a_one_seed_report_says_every_p_value_is_conditional_on_that_fine_tune(tmp_path, planted, two_seeds):
    planted["figures"] = {}
    one = report(planted)
    assert "every p-value and interval in this report is conditional on that one fine-tune" in one
    assert "mean over seeds" not in one
    two_seeds["figures"] = {}
    several = report(two_seeds)
    assert "conditional on that one fine-tune" not in several
    assert "**all seeds must pass**" in several and "| chef | mean over seeds |" in several


def test_the_analysis_is_bitwise_repeatable_and_a_new_seed_leaves_the_first_seeds_numbers_alone(tmp_path):
    """REPRODUCIBILITY.md's claims about the analysis: the same inputs give the same bytes, and every draw is
    seeded by what it is about, so a run that adds a seed reports the first seed's numbers unchanged."""
    root = store.from_path(tmp_path / "inputs")
    rng = np.random.default_rng(3)
    first = [write_cell(root, f"{s['name']}-s42", seed_dependent, rng, source=s["name"], seed=42) for s in SOURCES]
    second = [write_cell(root, f"{s['name']}-s43", seed_dependent, rng, source=s["name"], seed=43) for s in SOURCES]
    base = write_cell(root, "base", null_grid, rng)
    bystanders = [{k: b[k] for k in ("id", "kind", "noun", "trait", "level")} for b in GRID]

    def run(cells, seeds):
        cfg = Config(store=root, run_id="t", cell="analysis", sources=SOURCES, bystanders=bystanders, cells=cells,
                       seeds=seeds, n_boot=300, n_perm=300)
        return results(cfg)

    one = run([*first, base], [42])
    assert json.dumps(one, sort_keys=True) == json.dumps(run([*first, base], [42]), sort_keys=True)
    two = run([*first, *second, base], [42, 43])
    for source in ("chef", "robot"):
        assert two["leakage"][source]["per_seed"]["42"] == one["leakage"][source]["per_seed"]["42"]
        assert two["h3"]["per_seed"]["42"]["per_source"][source] == one["h3"]["per_seed"]["42"]["per_source"][source]
    assert two["h2"]["noun_match_test"]["42"] == one["h2"]["noun_match_test"]["42"]
    assert two["axis_permutation_leak"]["42"] == one["axis_permutation_leak"]["42"]


def test_a_judge_that_abstains_on_everything_is_reported_as_no_coherence_measured_not_as_scored(tmp_path, planted):
    silent = analyse_synthetic(tmp_path, planted_noun, n_perm=200, abstaining_judge=True)
    coh = silent["coherence"]
    assert sum(coh["n_scores"].values()) == 0 and sum(coh["n_judge_errors"].values()) == 0
    assert set(coh["n_abstained"].values()) == {len(GRID)} and not any(coh["flagged"].values())
    text = "\n".join(coherence_section(silent))
    assert f"the judge scored none of the {len(GRID) * (len(SOURCES) + 1)} completions" in text
    assert f"It abstained on {len(GRID) * (len(SOURCES) + 1)}" in text
    # a judge that scored says nothing of the kind, and its abstentions column is zero
    scored = "\n".join(coherence_section(planted))
    assert "not measured" not in scored and set(planted["coherence"]["n_abstained"].values()) == {0}
