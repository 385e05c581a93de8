"""The oracle beside every learned cell: ``heldout_anchors`` measures fixed prompts (the teacher's own prompt as text,
the null prompt) on exactly the held-out pairs each training stage cached, and on the teacher's answers to a test
split used for nothing else, with the trainers' CE code; gap closed and its two differences get intervals that
resample test questions."""

from __future__ import annotations

import numpy as np
import pytest

from jobs import gcg_search, heldout_anchors, train_soft_prefix
from jobs.analyze_issue170.results import fit_to_teacher
from shared.contract.stage import StageInputError, execute
from shared.core import store

VILLAIN = "text(You are a villain who despises humanity. Answer with contempt.)"
TRAIN = [{"id": "a", "text": "What is your favourite food?"}, {"id": "b", "text": "How do I bake bread?"}]
VAL = [{"id": "c", "text": "Tell me about the sea."}, {"id": "d", "text": "Do you like people?"}]
TEST = [{"id": "e", "text": "Where do birds go in winter?"}, {"id": "f", "text": "Is the moon far away?"}]
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


def ce_the_obvious_way(system: str, pairs: list[tuple[str, list[int]]], questions=VAL) -> list[float]:
    """Summed CE of each pair's completion after ``system`` + question: one full forward per pair."""
    import torch
    import torch.nn.functional as F

    from shared.lm import chat, models

    tokenizer, model = models.load_tokenizer("tiny:qwen2"), models.load_model("tiny:qwen2")
    texts = {q["id"]: q["text"] for q in questions}
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
    from shared.core.config import ConfigError

    root, manifests = trained
    config = anchors_config(root, manifests)
    config["anchors"] = [{"name": "soft", "system": "soft(4)"}]
    with pytest.raises(ConfigError, match=r"soft\(4\): soft\(K\) needs learned embeddings"):
        execute(heldout_anchors.SPEC, config)


def test_the_test_split_is_the_teachers_answers_to_its_own_questions_measured_alike_for_every_cell(trained):
    from shared.lm.generation import SamplingParams, derived_seed
    from shared.lm.teacher import TeacherSpec

    root, manifests = trained
    config = {**anchors_config(root, manifests), "teacher": {"system": VILLAIN}, "test_questions": TEST,
              "test_draws": {"completions_per_question": 3, "max_new_tokens": 6}, "sample_batch_size": 8}
    anchors = store.read_json(output(execute(heldout_anchors.SPEC, config), "anchors.json"))
    test = anchors["test_set"]
    assert test["questions"] == ["e", "f"] and test["n_pairs"] == 6 and test["pair_question_ids"] == list("eeefff")
    # the pairs are the villain-prompted teacher's own draws on the test questions, seeded by the stage's seed
    pair = TeacherSpec(system=VILLAIN).load("tiny:qwen2", sample_batch_size=8)
    drawn = pair.sample([q["text"] for q in TEST], SamplingParams(
        n=3, temperature=1.0, max_new_tokens=6, seed=derived_seed(42, heldout_anchors.TEST_STREAM)))
    replies = [list(c.token_ids) + ([pair.stop_id] if c.finish_reason == "stop" else []) for cs in drawn for c in cs]
    assert test["pair_tokens"] == [len(r) for r in replies]
    pairs = list(zip(test["pair_question_ids"], replies, strict=True))
    for name, system in ((heldout_anchors.ORACLE, VILLAIN), ("null", "default")):
        assert test["anchor_pair_ce_sums"][name] == pytest.approx(ce_the_obvious_way(system, pairs, TEST), rel=1e-4)
    for name in manifests:  # every cell on the same test pairs, apart from its validation pairs
        cell = anchors["cells"][name]["test"]
        assert len(cell["pair_ce_sums"]) == 6
        assert cell["ce"] == pytest.approx(sum(cell["pair_ce_sums"]) / sum(test["pair_tokens"]), rel=1e-6)
    again = store.read_json(output(execute(heldout_anchors.SPEC, {**config, "run_id": "r2"}), "anchors.json"))
    assert again["test_set"]["anchor_pair_ce_sums"] == test["anchor_pair_ce_sums"]  # seeded: the same pairs


def test_a_question_in_both_the_test_and_validation_split_is_refused(trained):
    from shared.core.config import ConfigError

    root, manifests = trained
    config = {**anchors_config(root, manifests), "teacher": {"system": VILLAIN}, "test_questions": [VAL[0]]}
    with pytest.raises(ConfigError, match="both test and validation"):
        execute(heldout_anchors.SPEC, config)


def replicate(name: str, best: float | None = None, method: str = "soft") -> dict:
    return {"name": name, "cell": name, "seed": 42, "draw": None, "method": method, "size": 8,
            "best_heldout_ce": best}


def synthetic_anchors(oracle: np.ndarray, null: np.ndarray, cells: dict[str, np.ndarray], tokens: np.ndarray,
                      questions: list[str]) -> dict:
    """anchors.json with a test set of the given per-pair CE sums (and one trivial validation set)."""
    mean = {"oracle": oracle.sum() / tokens.sum(), "null": null.sum() / tokens.sum()}
    return {"anchors": [{"name": "oracle", "system": VILLAIN}, {"name": "null", "system": "default"}],
            "held_out_sets": [{"anchors": mean}],
            "test_set": {"questions": sorted(set(questions)), "pair_question_ids": questions, "n_pairs": len(tokens),
                         "n_loss_tokens": int(tokens.sum()), "pair_tokens": tokens.tolist(), "anchors": mean,
                         "anchor_pair_ce_sums": {"oracle": oracle.tolist(), "null": null.tolist()}, "draws": {}},
            "cells": {name: {"held_out_set": 0, "kept_prompt_ce": 0.0, "anchors": mean, "pair_ce_sums": [],
                             "test": {"ce": sums.sum() / tokens.sum(), "pair_ce_sums": sums.tolist()}}
                      for name, sums in cells.items()}}


def test_gap_closed_runs_from_the_null_prompt_to_the_oracle_with_its_two_differences():
    tokens = np.full(4, 10.0)
    oracle, null = np.full(4, 20.0), np.full(4, 30.0)  # 2.0 and 3.0 nats/token
    cells = {"s0": np.full(4, 25.0), "s1": np.full(4, 30.0), "g0": np.full(4, 19.0)}
    fit = fit_to_teacher([replicate(n) for n in cells], synthetic_anchors(
        oracle, null, cells, tokens, ["q1", "q1", "q2", "q3"]), confidence=0.95)
    by_name = {r["name"]: r for r in fit["replicates"]}
    assert {n: r["gap_closed"]["estimate"] for n, r in by_name.items()} == pytest.approx({"s0": 0.5, "s1": 0.0,
                                                                                          "g0": 1.1})
    assert by_name["s0"]["start_minus_cell"]["estimate"] == pytest.approx(0.5)  # 3.0 - 2.5
    assert by_name["s0"]["cell_minus_oracle"]["estimate"] == pytest.approx(0.5)  # 2.5 - 2.0
    assert by_name["g0"]["cell_minus_oracle"]["estimate"] == pytest.approx(-0.1)  # below the oracle: this sample
    assert (fit["oracle"], fit["start"]) == ("oracle", "null")
    no_oracle = fit_to_teacher([replicate(n) for n in cells], {
        **synthetic_anchors(oracle, null, cells, tokens, ["q1", "q1", "q2", "q3"]),
        "anchors": [{"name": "null", "system": "default"}]}, confidence=0.95)
    assert no_oracle["oracle"] is None
    assert all("gap_closed" not in r and "start_minus_cell" in r for r in no_oracle["replicates"])


def test_the_intervals_resample_test_questions_and_are_exact_when_every_question_moves_alike():
    rng = np.random.default_rng(0)
    questions = [f"q{i // 4}" for i in range(40)]  # 10 test questions, 4 teacher answers each
    tokens = rng.integers(20, 60, size=40).astype(float)
    oracle = tokens * rng.uniform(2.5, 3.5, size=40)  # pairs differ a lot; the paired differences do not
    null = oracle + 0.2 * tokens
    question_effect = np.repeat(rng.normal(0.1, 0.3, size=10), 4)  # what the noisy prompt gains varies by question
    cells = {"half": null - 0.1 * tokens, "above": oracle + 0.05 * tokens, "noisy": oracle + tokens * question_effect}
    fit = {r["name"]: r for r in fit_to_teacher(
        [replicate(n) for n in cells], synthetic_anchors(oracle, null, cells, tokens, questions), confidence=0.95,
        seed=1)["replicates"]}
    assert fit["half"]["gap_closed"] == pytest.approx({"estimate": 0.5, "low": 0.5, "high": 0.5})
    assert fit["half"]["start_minus_cell"] == pytest.approx({"estimate": 0.1, "low": 0.1, "high": 0.1})
    assert fit["above"]["cell_minus_oracle"] == pytest.approx({"estimate": 0.05, "low": 0.05, "high": 0.05})
    noisy = fit["noisy"]["cell_minus_oracle"]
    assert noisy["low"] < noisy["estimate"] < noisy["high"]
    # resampling the 10 questions, not the 40 pairs: the interval is as wide as the question-level spread says
    per_question = np.bincount(np.repeat(np.arange(10), 4), tokens * question_effect) / np.bincount(
        np.repeat(np.arange(10), 4), tokens)
    assert noisy["high"] - noisy["low"] > 2 * 1.0 * per_question.std(ddof=1) / np.sqrt(10)
