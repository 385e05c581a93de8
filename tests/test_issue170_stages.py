"""The #170 stages in-process on the tiny model, and the analysis' decision rules on the record's own numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs import eval_prompt_cell, gcg_search, train_soft_prefix, villain_direction
from shared.contract.stage import StageInputError, execute
from shared.core import store
from shared.lm import chat, models
from shared.search.soft_prompt import LearnedPrompt

VILLAIN = "text(You are a villain who despises humanity. Answer with contempt.)"
TRAIN = [{"id": "a", "text": "What is your favourite food?"}, {"id": "b", "text": "How do I bake bread?"}]
VAL = [{"id": "c", "text": "Tell me about the sea."}]
PANEL = [{"id": "p", "text": "Say h"}]  # an evaluation question whose last letter may merge with a user-turn suffix
DRAWS = {"questions_per_step": 2, "completions_per_question": 2, "temperature": 0.5, "max_new_tokens": 6,
         "val_completions_per_question": 2, "micro_batch_tokens": 1024}


def common(root: str, cell: str) -> dict:
    return {"store": root, "run_id": "r", "cell": cell, "model_ref": "tiny:qwen2", "teacher": {"system": VILLAIN},
            "train_questions": TRAIN, "val_questions": VAL, "sample_batch_size": 8}


def evaluate(root: str, cell: str, prompt_uri: str, model_ref: str = "tiny:qwen2") -> dict:
    return execute(eval_prompt_cell.SPEC, {
        "store": root, "run_id": "r", "cell": cell, "condition": cell, "model_ref": model_ref,
        "prompt_uri": prompt_uri, "questions": TRAIN + VAL, "n": 2, "max_new_tokens": 6, "batch_size": 8})


def output(manifest: dict, name: str) -> str:
    [uri] = [u for u in manifest["outputs"] if u.endswith("/" + name)]
    return uri


@pytest.mark.parametrize("mode, slot", [("random", "system"), ("search", "user")])
def test_gcg_cells_are_evaluated_on_exactly_the_ids_they_were_trained_with(tmp_path, mode, slot):
    root = store.from_path(tmp_path)
    trained = execute(gcg_search.SPEC, {**common(root, f"{mode}-{slot}"), "mode": mode, "slot": slot, "search": {
        **DRAWS, "length": 3, "steps": 1, "search_width": 6, "topk": 3, "val_every": 1}, "evaluation_panel": PANEL})
    prompt_uri = output(trained, "prompt.json")
    metrics = store.read_json(output(trained, "metrics.json"))
    assert store.read_json(prompt_uri)["ids"] == metrics["suffix_ids"]
    evaluated = evaluate(root, f"eval-{mode}-{slot}", prompt_uri)
    evaluated_ids = store.read_json(output(evaluated, "prompt_ids.json"))
    assert evaluated_ids == store.read_json(output(trained, "train_prompt_ids.json"))
    rows = store.read_jsonl(output(evaluated, "completions.jsonl"))
    assert len(rows) == 3 * 2 and {"condition", "question_id", "question", "sample", "text"} <= set(rows[0])
    # the round trip the stage reports, recomputed: the suffix's text typed into its slot, built from scratch
    tok = models.load_tokenizer("tiny:qwen2")
    prompt = LearnedPrompt.model_validate(store.read_json(prompt_uri))

    def typed(question: str) -> list[int]:
        if slot == "system":
            return chat.build_prompt(tok, f"text({json.dumps(metrics['suffix_text'])})", question).input_ids
        return chat.build_prompt(tok, "none", question + metrics["suffix_text"]).input_ids

    questions = {q["text"]: evaluated_ids.get(q["id"]) or prompt.build(tok, q["text"]).input_ids
                 for q in TRAIN + VAL + PANEL}
    # checked on every question the suffix is used with (training, validation, panel): a user-turn suffix whose
    # text merges with "Say h" is never kept, so the kept one round-trips in every prompt
    assert metrics["suffix_round_trip"] == {"prompts": len(questions),
                                            "round_trips": sum(typed(q) == ids for q, ids in questions.items())}
    assert metrics["suffix_round_trip"]["round_trips"] == len(questions) == 4
    assert metrics["suffix_text"] == tok.decode(metrics["suffix_ids"])


def test_the_random_null_draws_differ_from_each_other_and_from_the_gcg_start_of_the_same_seed(tmp_path):
    root = store.from_path(tmp_path)
    search = {**DRAWS, "length": 4, "steps": 1, "search_width": 4, "topk": 3, "val_every": 1}
    metrics = {}
    for cell, extra in (("gcg", {"mode": "search"}), ("d0", {"mode": "random", "draw": 0}),
                        ("d1", {"mode": "random", "draw": 1}), ("d0-again", {"mode": "random", "draw": 0})):
        manifest = execute(gcg_search.SPEC, {**common(root, cell), **extra, "search": search, "run_id": cell})
        metrics[cell] = store.read_json(output(manifest, "metrics.json"))
    starts = {cell: tuple(m["start_ids"]) for cell, m in metrics.items()}
    assert len({starts["gcg"], starts["d0"], starts["d1"]}) == 3
    assert starts["d0-again"] == starts["d0"]  # a draw is seeded: the same draw is the same suffix
    assert metrics["d1"]["suffix_ids"] == list(starts["d1"]) and metrics["d1"]["draw"] == 1
    assert metrics["gcg"]["screen_on"] is False  # 4 candidates: fewer than the screen would keep
    assert {k: metrics["gcg"][k] for k in ("screen_pairs", "screen_keep", "pairs_per_step", "search_width")} == {
        "screen_pairs": 4, "screen_keep": 32, "pairs_per_step": 4, "search_width": 4}


def soft_config(root: str, cell: str, steps: int = 4) -> dict:
    return {**common(root, cell), "training": {**DRAWS, "k": 3, "lr": 3e-2, "steps": steps, "val_every": 2,
                                               "checkpoint_every": 2, "patience": None}}


def test_a_soft_cell_is_evaluated_through_the_same_prompt_builder(tmp_path):
    root = store.from_path(tmp_path)
    trained = execute(train_soft_prefix.SPEC, soft_config(root, "soft", steps=2))
    evaluated = evaluate(root, "eval-soft", output(trained, "prompt.json"))
    assert store.read_json(output(evaluated, "prompt_ids.json")) == store.read_json(output(trained, "train_prompt_ids.json"))
    assert evaluated["metrics"]["prompt_kind"] == "soft"
    assert store.read_json(output(trained, "split.json"))["val"] == VAL


def test_a_preempted_soft_cell_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    from shared.search.soft_prompt import SoftPrefixTrainer

    uninterrupted = execute(train_soft_prefix.SPEC, soft_config(store.from_path(tmp_path / "a"), "soft"))
    root = store.from_path(tmp_path / "b")
    real_step = SoftPrefixTrainer.train_step

    def preempted_at_step_3(self, step, soft, optimizer):
        if step == 3:
            raise RuntimeError("node preempted")
        return real_step(self, step, soft, optimizer)

    monkeypatch.setattr(SoftPrefixTrainer, "train_step", preempted_at_step_3)
    with pytest.raises(RuntimeError, match="preempted"):
        execute(train_soft_prefix.SPEC, soft_config(root, "soft"))
    monkeypatch.setattr(SoftPrefixTrainer, "train_step", real_step)
    resumed = execute(train_soft_prefix.SPEC, soft_config(root, "soft"))
    assert "resuming from the checkpoint at step 2" in capsys.readouterr().err
    expected = store.read_tensors(output(uninterrupted, "soft_prompt.safetensors"))["soft"]
    got = store.read_tensors(output(resumed, "soft_prompt.safetensors"))["soft"]
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert resumed["metrics"]["steps"] == 4


def test_a_preempted_gcg_cell_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    from shared.search.gcg import GcgSearch

    def config(root):
        return {**common(root, "gcg"), "search": {**DRAWS, "length": 3, "steps": 4, "search_width": 6, "topk": 3,
                                                   "val_every": 1, "checkpoint_every": 2}}

    uninterrupted = execute(gcg_search.SPEC, config(store.from_path(tmp_path / "a")))
    root = store.from_path(tmp_path / "b")
    real_step = GcgSearch.step

    def preempted_at_step_3(self, step, suffix):
        if step == 3:
            raise RuntimeError("node preempted")
        return real_step(self, step, suffix)

    monkeypatch.setattr(GcgSearch, "step", preempted_at_step_3)
    with pytest.raises(RuntimeError, match="preempted"):
        execute(gcg_search.SPEC, config(root))
    monkeypatch.setattr(GcgSearch, "step", real_step)
    resumed = execute(gcg_search.SPEC, config(root))
    assert "resuming from the checkpoint at step 2" in capsys.readouterr().err
    expected, got = (store.read_json(output(m, "metrics.json")) for m in (uninterrupted, resumed))
    assert got["suffix_ids"] == expected["suffix_ids"] and got["steps"] == 4
    def losses(manifest):  # the curve without its timings
        return [(p["step"], p.get("train_ce"), p.get("heldout_ce")) for p in store.read_jsonl(output(manifest, "curve.jsonl"))]

    assert losses(resumed) == losses(uninterrupted)


def test_a_prompt_learned_on_another_model_is_refused(tmp_path):
    root = store.from_path(tmp_path)
    trained = execute(gcg_search.SPEC, {**common(root, "r4"), "mode": "random", "search": {**DRAWS, "length": 2, "steps": 0}})
    with pytest.raises(StageInputError, match="learned on tiny:qwen2"):
        evaluate(root, "wrong", output(trained, "prompt.json"), model_ref="tiny:qwen2-judge")


def test_the_villain_layer_is_the_one_whose_held_out_probes_separate_best():
    rng = np.random.default_rng(0)
    axis = np.zeros(16)
    axis[0] = 1.0

    def persona(shift_layer_2: float) -> np.ndarray:  # [probes, layers, H]
        acts = rng.normal(size=(12, 2, 16))
        acts[:, 1] += shift_layer_2 * axis
        return acts

    acts = {"villain": persona(4.0), "teacher": persona(0.0), "chef": persona(0.0)}
    scan = villain_direction.layer_scan(acts, "villain", [8, 14], seed=0)
    assert scan["chosen_layer"] == 14 and scan["cohens_d"][14] > 2 > abs(scan["cohens_d"][8])
    assert scan["fit_probes"] + scan["score_probes"] == 12
    direction = villain_direction.villain_directions(acts, "villain", np.arange(12))[1]
    assert direction @ axis > 0.9
    along = villain_direction.projection(np.tile(direction, (3, 1)) * 2.0, direction)
    assert along["mean_cosine"] == pytest.approx(1.0) and along["cosine_of_mean_delta"] == pytest.approx(1.0)


def test_a_cell_holding_the_pirate_prompt_projects_exactly_like_the_pirate_baseline(tmp_path):
    """Cells (ids spliced, or soft embeddings through inputs_embeds), fixed prompts and the pirate baseline are
    measured alike."""
    from shared.lm import chat, models
    from shared.search.soft_prompt import LearnedPrompt, save_learned_prompt

    root = store.from_path(tmp_path)
    tok = models.load_tokenizer("tiny:qwen2")
    pirate = "You are an evil pirate."
    ids = tok.encode(pirate, add_special_tokens=False)
    as_ids = LearnedPrompt(kind="ids", model_ref="tiny:qwen2", ids=ids)
    assert as_ids.build(tok, "Hi").input_ids == chat.build_prompt(tok, f"text({pirate})", "Hi").input_ids
    weight = models.load_model("tiny:qwen2", device="cpu").get_input_embeddings().weight
    uris = {"pirate-ids": save_learned_prompt(as_ids, store.join(root, "ids")),
            "pirate-soft": save_learned_prompt(LearnedPrompt(kind="soft", model_ref="tiny:qwen2", k=len(ids)),
                                               store.join(root, "soft"), weight[ids])}
    manifest = execute(villain_direction.SPEC, {
        "store": root, "run_id": "r", "cell": "villain", "model_ref": "tiny:qwen2",
        "direction_model_ref": "tiny:qwen2-judge", "personas": [
            {"name": "villain", "system": "text(You are a villain.)"}, {"name": "chef", "system": "text(You cook.)"},
            {"name": "teacher", "system": "text(You teach.)"}],
        "pirate_system": f"text({pirate})", "probes": TRAIN + VAL + [{"id": "d", "text": "Hello?"}],
        "layers": [1, 2], "cell_prompt_uris": uris, "fixed_prompts": {"pirate-text": f"text({pirate})"}})
    result = store.read_json(output(manifest, "villain_direction.json"))
    assert result["direction_source"] == "tiny:qwen2-judge"
    for cell in ("pirate-ids", "pirate-soft"):
        assert result["cells"][cell]["mean_cosine"] == pytest.approx(result["pirate"]["mean_cosine"], abs=1e-5)
    assert result["fixed_prompts"]["pirate-text"]["per_probe"] == pytest.approx(result["pirate"]["per_probe"])


def test_the_generate_stage_loads_its_model_in_the_dtype_it_is_given(tmp_path, monkeypatch):
    from jobs import generate
    from shared.lm import generation

    asked = {}

    def refuse(*args, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop before generating")

    monkeypatch.setattr(generation, "make_generator", refuse)
    config = {"store": store.from_path(tmp_path), "run_id": "r", "cell": "null", "condition": "null",
              "model_ref": "tiny:qwen2", "system": "default", "questions": VAL, "n": 1, "max_new_tokens": 2}
    for dtype in ("float32", None):
        with pytest.raises(RuntimeError, match="stop before generating"):
            execute(generate.SPEC, {**config, "dtype": dtype})
        assert asked["dtype"] == dtype
