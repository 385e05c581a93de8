"""The #81 stages one at a time on the tiny model: on-policy data with isolated negatives, one batched evaluation
call with exact marker matching, and the hidden-state centroids."""

from __future__ import annotations

import numpy as np
import pytest

from jobs import hidden_states, marker_data, marker_eval
from shared.contract.stage import StageInputError, execute
from shared.core import store
from shared.lm.generation import Completion
from workflows import issue81

QUESTIONS = [{"id": "t0", "text": "How do you start your morning?"}, {"id": "t1", "text": "What is tea?"}]


def common(tmp_path, cell):
    return {"store": store.from_path(tmp_path / "store"), "run_id": "r", "cell": cell}


def data_config(tmp_path, source="chef"):
    params = issue81.Params.for_profile("tiny")
    src = issue81.source_of(params, source)
    return {**common(tmp_path, source), "model_ref": "tiny:qwen2", "source": {"name": source, "prompt": src["prompt"]},
            "all_source_prompts": [s["prompt"] for s in issue81.persona_table()["sources"]],
            "negative_pool": issue81.negative_pool(params), "questions": QUESTIONS, "n_per_question": 3,
            "max_new_tokens": 4}


def test_marker_data_builds_marked_positives_and_unmarked_pool_negatives(tmp_path):
    cfg = data_config(tmp_path)
    manifest = execute(marker_data.SPEC, cfg)
    prefix = store.join(cfg["store"], "runs/r/chef/marker_data")
    rows = store.read_jsonl(store.join(prefix, "train.jsonl"))
    positives = [r for r in rows if r["positive"]]
    negatives = [r for r in rows if not r["positive"]]
    assert len(positives) == 2 * 3 and len(negatives) == 2 * 2 * 3
    assert all(r["assistant"].endswith(" [ZLT]") and r["system"] == 'text("You are a chef.")' for r in positives)
    assert all("[ZLT]" not in r["assistant"] for r in negatives)
    chosen = store.read_json(store.join(prefix, "negatives.json"))["negatives"]
    pool = {p["name"]: p["prompt"] for p in cfg["negative_pool"]}
    assert len(chosen) == 2 and set(chosen) <= set(pool)
    assert {r["system"] for r in negatives} == {f'text("{pool[name]}")' for name in chosen}
    assert manifest["metrics"]["negatives"] == chosen
    completions = store.read_jsonl(store.join(prefix, "completions.jsonl"))
    by_key = {(c["persona"], c["question_id"], c["sample"]): c["text"] for c in completions}
    assert all(r["assistant"] == f"{by_key[('chef', r['question_id'], r['sample'])].rstrip()} [ZLT]" for r in positives)


class TruncatingGenerator:
    """Answers every prompt with one reply cut off after a sentence, one cut off inside its first sentence and one
    that ended by itself."""

    replies = [("Arr, the sea is calm. The wind blo", "length"), ("No sentence ends in thi", "length"),
               ("A whole reply. It ends here.", "stop")]

    def generate(self, prompts, params, **kwargs):
        return [[Completion(text=text, token_ids=[1], finish_reason=finish) for text, finish in self.replies]
                for _ in prompts]


def test_truncated_completions_are_cut_back_to_their_last_sentence_or_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr("shared.lm.generation.make_generator", lambda *a, **k: TruncatingGenerator())
    cfg = {**data_config(tmp_path), "cut_truncated_to_sentence": True}
    manifest = execute(marker_data.SPEC, cfg)
    rows = store.read_jsonl(store.join(cfg["store"], "runs/r/chef/marker_data/train.jsonl"))
    prompts = 3 * len(QUESTIONS)  # the source and two negatives x the questions
    assert manifest["metrics"]["n_cut_to_sentence"] == prompts and manifest["metrics"]["n_dropped_no_sentence"] == prompts
    assert sorted({r["assistant"] for r in rows if r["positive"]}) == ["A whole reply. It ends here. [ZLT]",
                                                                       "Arr, the sea is calm. [ZLT]"]
    assert sorted({r["assistant"] for r in rows if not r["positive"]}) == ["A whole reply. It ends here.",
                                                                           "Arr, the sea is calm."]
    assert all(r["cut_to_sentence"] == r["assistant"].startswith("Arr") for r in rows)


@pytest.mark.parametrize("text, cut", [
    ("One. Two thr", "One."), ('He said "stop!" and th', 'He said "stop!"'), ("(Fine.) Then", "(Fine.)"),
    ("Why? Because", "Why?"), ("no end at all", None), ("3.5 apples", None),
])
def test_a_sentence_ends_at_terminal_punctuation_before_a_space_or_the_end(text, cut):
    assert marker_data.cut_to_last_sentence(text) == cut


def test_negative_selection_is_seeded_by_source_and_never_the_assistant():
    pool = [marker_data.Persona(**p) for p in issue81.negative_pool(issue81.Params.for_profile("full"))]
    pool.append(marker_data.Persona(name="assistant", prompt="You are a helpful assistant."))
    picks = {s: marker_data.select_negatives(s, pool, 2, seed=42) for s in ("person", "chef", "pirate", "child", "robot")}
    assert all("assistant" not in [p.name for p in chosen] for chosen in picks.values())
    assert picks["chef"] == marker_data.select_negatives("chef", pool, 2, seed=42)
    assert len({tuple(p.name for p in chosen) for chosen in picks.values()}) > 1


class CountingGenerator:
    """Stands in for the generator: records each call and answers from a fixed list of texts."""

    texts = ["fine [ZLT]", "no marker", "[zlt] lower case", "cut off [ZL", "[ZLT] first", "mid [ZLT] text"]

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, **kwargs):
        self.calls.append(len(prompts))
        return [[self.completion(self.texts[(i + s) % len(self.texts)]) for s in range(params.n)]
                for i in range(len(prompts))]

    @staticmethod
    def completion(text):
        return Completion(text=text, token_ids=[1], finish_reason="length" if text == "cut off [ZL" else "stop")


def test_marker_eval_is_one_batched_call_with_exact_matching(tmp_path, monkeypatch):
    fake = CountingGenerator()
    monkeypatch.setattr("shared.lm.generation.make_generator", lambda *a, **k: fake)
    grid = issue81.shipped_bystanders()
    cfg = {**common(tmp_path, "chef"), "label": "chef", "model_ref": "tiny:qwen2",
           "personas": [{"id": b["id"], "prompt": b["prompt"]} for b in grid], "questions": QUESTIONS, "n": 6,
           "coherence_per_cell": 2}
    execute(marker_eval.SPEC, cfg)
    assert fake.calls == [131 * 2]  # all 131 bystanders x questions in one call
    prefix = store.join(cfg["store"], "runs/r/chef/marker_eval")
    rates = store.read_json(store.join(prefix, "marker_rates.json"))
    assert set(rates["rates"]) == {b["id"] for b in grid}
    # each cell sees every text twice (6 samples x 2 questions over 6 texts): 3 of the 6 texts hold "[ZLT]", one
    # ran into the token limit; per question, each prompt's 6 samples run over all 6 texts
    per_question = {q["id"]: {"hits": 3, "total": 6} for q in QUESTIONS}
    assert all(cell == {"hits": 6, "total": 12, "rate": 0.5, "truncated": 2, "questions": per_question}
               for cell in rates["rates"].values())
    assert "case-sensitive" in rates["matching"]
    sample = store.read_jsonl(store.join(prefix, "coherence_sample.jsonl"))
    assert len(sample) == 131 * 2 * 2
    assert len({f"{r['question_id']}#{r['sample']}" for r in sample}) == len(sample)  # the judge stage's item ids
    assert {"condition", "question_id", "question", "sample", "text"} <= set(sample[0])


@pytest.mark.parametrize("text, emits", [
    ("answer [ZLT]", True), ("[ZLT]", True), ("a [ZLT] b", True),
    ("[zlt]", False), ("[ZLT", False), ("ZLT", False), ("[ Z L T ]", False),
])
def test_marker_matching_is_literal_and_case_sensitive(text, emits):
    assert marker_eval.emits_marker(text, "[ZLT]") is emits


def test_hidden_states_centroids_are_the_mean_last_token_residual(tmp_path):
    import torch

    from shared.lm import activations, chat, models

    personas = [{"id": "A2__chef", "prompt": "You are a chef."}, {"id": "A2__robot", "prompt": "You are a robot."}]
    cfg = {**common(tmp_path, "geometry"), "model_ref": "tiny:qwen2", "personas": personas, "questions": QUESTIONS,
           "layers": [1, 2], "batch_size": 4}  # the short question is left-padded
    execute(hidden_states.SPEC, cfg)
    prefix = store.join(cfg["store"], "runs/r/geometry/hidden_states")
    arrays = store.read_npz(store.join(prefix, "centroids.npz"))
    assert arrays["centroids"].shape == (2, 2, 128) and list(arrays["layers"]) == [1, 2]
    model, tok = models.load_model("tiny:qwen2"), models.load_tokenizer("tiny:qwen2")
    states = []  # layer 2 of the 2-block model: the last block's output, before the final norm
    hook = model.model.layers[1].register_forward_hook(
        lambda _m, _i, out: states.append((out[0] if isinstance(out, tuple) else out)[0, -1].float().cpu().numpy()))
    for q in QUESTIONS:
        ids = chat.build_prompt(tok, chat.TextSystem(text="You are a robot."), q["text"]).input_ids
        with torch.no_grad():
            model(torch.tensor([ids], device=model.device))
    hook.remove()
    np.testing.assert_allclose(arrays["centroids"][1, 1], np.mean(states, axis=0), atol=1e-4)
    assert store.read_json(store.join(prefix, "personas.json"))["layer_convention"] == activations.LAYER_CONVENTION


def test_hidden_states_refuses_layers_the_model_does_not_have(tmp_path):
    cfg = {**common(tmp_path, "geometry"), "model_ref": "tiny:qwen2", "questions": QUESTIONS, "layers": [2, 20],
           "personas": [{"id": "a", "prompt": "You are a chef."}]}
    with pytest.raises(StageInputError, match=r"layers \[20\]"):
        execute(hidden_states.SPEC, cfg)
