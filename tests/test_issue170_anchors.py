"""The oracle beside every learned cell: ``heldout_anchors`` measures fixed prompts (the teacher's own prompt as text,
the null prompt) on exactly the held-out pairs each training stage cached, with the trainers' CE code."""

from __future__ import annotations

import numpy as np
import pytest

from jobs import analyze_issue170, gcg_search, heldout_anchors, train_soft_prefix
from shared import store
from shared.stage import StageInputError, execute

VILLAIN = "text(You are a villain who despises humanity. Answer with contempt.)"
TRAIN = [{"id": "a", "text": "What is your favourite food?"}, {"id": "b", "text": "How do I bake bread?"}]
VAL = [{"id": "c", "text": "Tell me about the sea."}, {"id": "d", "text": "Do you like people?"}]
DRAWS = {"questions_per_step": 2, "completions_per_question": 2, "temperature": 1.0, "max_new_tokens": 6,
         "val_completions_per_question": 2, "micro_batch_tokens": 1024}


def common(root: str, cell: str) -> dict:
    return {"store": root, "run_id": "r", "cell": cell, "model_ref": "tiny:qwen2", "teacher": {"system": VILLAIN},
            "train_questions": TRAIN, "val_questions": VAL, "sample_batch_size": 8}


def output(manifest: dict, name: str) -> str:
    [uri] = [u for u in manifest["outputs"] if u.endswith("/" + name)]
    return uri


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A soft cell and a GCG cell trained against the villain-prompted tiny model."""
    root = store.from_path(tmp_path_factory.mktemp("anchors"))
    soft = execute(train_soft_prefix.SPEC, {**common(root, "soft"), "training": {
        **DRAWS, "k": 3, "lr": 3e-2, "steps": 2, "val_every": 1, "patience": None}})
    gcg = execute(gcg_search.SPEC, {**common(root, "gcg"), "search": {
        **DRAWS, "length": 3, "steps": 2, "search_width": 6, "topk": 3, "val_every": 1}})
    return root, {"soft": soft, "gcg": gcg}


def anchors_config(root: str, manifests: dict, heldout_name: str = "val_set.json") -> dict:
    return {"store": root, "run_id": "r", "cell": "anchors", "model_ref": "tiny:qwen2", "val_questions": VAL,
            "micro_batch_tokens": 1024,
            "anchors": [{"name": heldout_anchors.ORACLE, "system": VILLAIN}, {"name": "null", "system": "default"}],
            "cells": {name: {"heldout_uri": output(m, heldout_name), "prompt_uri": output(m, "prompt.json")}
                      for name, m in manifests.items()}}


def ce_the_obvious_way(system: str, pairs: list[tuple[str, list[int]]]) -> list[float]:
    """Summed CE of each pair's completion after ``system`` + question: one full forward per pair."""
    import torch
    import torch.nn.functional as F

    from shared import chat, models

    tokenizer, model = models.load_tokenizer("tiny:qwen2"), models.load_model("tiny:qwen2")
    texts = {q["id"]: q["text"] for q in VAL}
    sums = []
    with torch.no_grad():
        for qid, reply in pairs:
            prompt = chat.build_prompt(tokenizer, system, texts[qid]).input_ids
            logits = model(input_ids=torch.tensor([prompt + reply], device=model.device)).logits[0].float().cpu()
            sums.append(float(F.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(reply), reduction="sum")))
    return sums


def stored_pairs(manifest: dict) -> list[tuple[str, list[int]]]:
    """(question id, completion ids) of a training stage's held-out set, matched to questions independently: the
    examples are question-major, ``val_completions_per_question`` per validation question."""
    rows = store.read_json(output(manifest, "val_set.json"))
    per_question = DRAWS["val_completions_per_question"]
    assert len(rows) == per_question * len(VAL)  # every tiny completion is kept (none is empty and unstopped)
    return [(VAL[n // per_question]["id"], r["input_ids"][r["assistant_start"]:r["loss_end"]]) for n, r in enumerate(rows)]


def test_the_oracle_and_null_anchors_are_the_ce_of_those_prompts_on_the_cells_own_held_out_pairs(trained):
    root, manifests = trained
    result = execute(heldout_anchors.SPEC, anchors_config(root, manifests))
    anchors = store.read_json(output(result, "anchors.json"))
    [held_out] = anchors["held_out_sets"]  # both cells cached the same teacher completions (same seed and draw)
    assert held_out["n_pairs"] == 4 and held_out["questions"] == ["c", "d"]
    pairs = stored_pairs(manifests["soft"])
    assert stored_pairs(manifests["gcg"]) == pairs
    tokens = [len(reply) for _, reply in pairs]
    assert held_out["pair_tokens"] == tokens and held_out["n_loss_tokens"] == sum(tokens)
    assert held_out["pair_question_ids"] == [qid for qid, _ in pairs]
    for name, system in ((heldout_anchors.ORACLE, VILLAIN), ("null", "default")):
        obvious = ce_the_obvious_way(system, pairs)
        assert held_out["anchor_pair_ce_sums"][name] == pytest.approx(obvious, rel=1e-4)
        assert held_out["anchors"][name] == pytest.approx(sum(obvious) / sum(tokens), rel=1e-4)
    assert held_out["anchors"][heldout_anchors.ORACLE] != pytest.approx(held_out["anchors"]["null"], rel=1e-3)
    for name, manifest in manifests.items():
        cell = anchors["cells"][name]
        assert cell["anchors"] == held_out["anchors"]
        # the kept prompt re-measured beside the anchors is the training stage's own best held-out CE
        best = store.read_json(output(manifest, "metrics.json"))["best_heldout_ce"]
        assert cell["kept_prompt_ce"] == pytest.approx(best, rel=1e-5)
        assert sum(cell["pair_ce_sums"]) / sum(tokens) == pytest.approx(best, rel=1e-5)


def test_a_held_out_set_from_other_questions_is_refused(trained, tmp_path):
    root, manifests = trained
    config = anchors_config(root, {"soft": manifests["soft"]})
    config["val_questions"] = [{"id": "x", "text": "Something else entirely?"}]
    with pytest.raises(StageInputError, match="matches none of the 1 validation questions"):
        execute(heldout_anchors.SPEC, config)


def test_an_anchor_must_be_a_fixed_prompt(trained):
    from shared.config import ConfigError

    root, manifests = trained
    config = anchors_config(root, manifests)
    config["anchors"] = [{"name": "soft", "system": "soft(4)"}]
    with pytest.raises(ConfigError, match="fixed prompt"):
        execute(heldout_anchors.SPEC, config)


def test_gap_closed_runs_from_the_null_prompt_to_the_oracle():
    anchors = {"anchors": [{"name": "oracle", "system": VILLAIN}, {"name": "null", "system": "default"}],
               "held_out_sets": [{"anchors": {"oracle": 2.0, "null": 3.0}}],
               "cells": {name: {"held_out_set": 0, "kept_prompt_ce": ce, "anchors": {"oracle": 2.0, "null": 3.0}}
                         for name, ce in (("s0", 2.5), ("s1", 3.0), ("g0", 1.9))}}
    rows = [{"cell": name, "method": "soft", "size": 8, "best_heldout_ce": ce + 1e-6}
            for name, ce in (("s0", 2.5), ("s1", 3.0), ("g0", 1.9))]
    rows.append({"cell": "null", "method": "reference", "size": None, "best_heldout_ce": None})
    fit = analyze_issue170.fit_to_teacher(rows, anchors)
    assert {r["cell"]: r["gap_closed"] for r in fit["cells"]} == pytest.approx({"s0": 0.5, "s1": 0.0, "g0": 1.1})
    assert (fit["oracle"], fit["start"]) == ("oracle", "null")
    assert fit["max_difference_from_training"] == pytest.approx(1e-6)
    no_oracle = analyze_issue170.fit_to_teacher(rows, {**anchors, "anchors": anchors["anchors"][1:]})
    assert no_oracle["oracle"] is None and all(r["gap_closed"] is None for r in no_oracle["cells"])


def synthetic_anchors(oracle: np.ndarray, null: np.ndarray, cells: dict[str, np.ndarray], tokens: np.ndarray) -> dict:
    mean = {"oracle": oracle.sum() / tokens.sum(), "null": null.sum() / tokens.sum()}
    return {"anchors": [{"name": "oracle", "system": VILLAIN}, {"name": "null", "system": "default"}],
            "held_out_sets": [{"anchors": mean, "pair_tokens": tokens.tolist(),
                               "anchor_pair_ce_sums": {"oracle": oracle.tolist(), "null": null.tolist()}}],
            "cells": {name: {"held_out_set": 0, "kept_prompt_ce": sums.sum() / tokens.sum(), "anchors": mean,
                             "pair_ce_sums": sums.tolist()} for name, sums in cells.items()}}


def test_the_distance_to_the_oracle_has_a_paired_interval_that_is_exact_when_every_pair_moves_alike():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 60, size=40).astype(float)
    oracle = tokens * rng.uniform(2.5, 3.5, size=40)  # pairs differ a lot; the paired differences do not
    null = oracle + 0.2 * tokens
    cells = {"half": null - 0.1 * tokens, "above": oracle + 0.05 * tokens,
             "noisy": oracle + tokens * rng.normal(0.1, 0.3, size=40)}
    rows = [{"cell": name, "method": "soft", "size": 8, "best_heldout_ce": None} for name in cells]
    fit = {r["cell"]: r for r in analyze_issue170.fit_to_teacher(rows, synthetic_anchors(oracle, null, cells, tokens),
                                                                  seed=1)["cells"]}
    assert fit["half"]["gap_closed"] == pytest.approx(0.5)
    for key, value in (("low", 0.5), ("high", 0.5)):  # every resample closes exactly half the gap
        assert fit["half"]["gap_closed_ci"][key] == pytest.approx(value)
    assert fit["above"]["minus_oracle"] == pytest.approx({"estimate": 0.05, "low": 0.05, "high": 0.05})
    noisy = fit["noisy"]["minus_oracle"]
    assert noisy["low"] < noisy["estimate"] < noisy["high"] and noisy["high"] - noisy["low"] > 0.05
    true_mean = 0.1  # the noise's mean: a 95% interval over 40 pairs covers it
    assert noisy["low"] < true_mean < noisy["high"]
