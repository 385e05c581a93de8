"""The local engine: dependency order, cached stages, failures block only their dependents, retries."""

from __future__ import annotations

import pytest

from shared import store
from workflows.engines.local import BLOCKED, CACHED, DONE, FAILED, PENDING, LocalEngine, run_plan
from workflows.plan import PlanBuilder

QUESTIONS = [{"id": "q1", "text": "Hello there?"}]


def gen(builder, name, **extra):
    return builder.add(name, "generate", name, condition=name, model_ref="tiny:qwen2", questions=QUESTIONS,
                       n=1, max_new_tokens=4, backend="hf", **extra)


@pytest.fixture
def builder(tmp_path):
    return PlanBuilder("issue164", "tiny", "engine-test", store.from_path(tmp_path / "store"))


def test_a_failed_task_blocks_its_dependents_and_the_rest_still_runs(builder):
    ok = gen(builder, "gen-ok")
    bad = gen(builder, "gen-bad", adapter_uri=store.join(builder.store, "no-such-adapter"))
    builder.add("score-after-bad", "score_classifier", "x", after=[bad],
                classifier_uri=store.join(builder.store, "c.joblib"), completions_uri=bad.output_uri("completions.jsonl"))
    result = run_plan(builder.plan({}), retries=1, live=False)
    assert not result.ok
    assert result.states["gen-ok"].status == DONE
    assert result.states["gen-bad"].status == FAILED
    assert result.states["gen-bad"].attempts == 1  # bad input (exit 2) is not retried
    assert result.states["score-after-bad"].status == BLOCKED
    assert "not found" in result.states["gen-bad"].log_path.read_text()
    assert store.exists(ok.output_uri("manifest.json"))
    assert not store.exists(bad.output_uri("manifest.json"))


def test_finished_tasks_are_cached_on_the_next_run(builder):
    gen(builder, "gen-a")
    plan = builder.plan({})
    assert run_plan(plan, live=False).ok
    again = run_plan(plan, live=False)
    assert again.states["gen-a"].status == CACHED and again.states["gen-a"].attempts == 0


class FakeProcess:
    def __init__(self, code):
        self.code = code

    def poll(self):
        return self.code


def test_a_crash_is_retried_until_the_retry_budget_is_spent(builder):
    gen(builder, "gen-a")
    engine = LocalEngine(builder.plan({}), retries=1, live=False)
    state = engine.states["gen-a"]
    state.status, state.attempts, state.process = "running", 1, FakeProcess(1)
    engine._poll(state)
    assert state.status == PENDING  # crashed once: tried again
    state.status, state.attempts, state.process = "running", 2, FakeProcess(1)
    engine._poll(state)
    assert state.status == FAILED


def test_gpu_tasks_get_one_visible_gpu_each(builder, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    gen(builder, "gen-a")
    gen(builder, "gen-b")
    gen(builder, "gen-c")
    engine = LocalEngine(builder.plan({}), live=False)
    started = []
    monkeypatch.setattr(engine, "_start", lambda state, gpu: (started.append((state.task.name, gpu)),
                                                               setattr(state, "status", "running"),
                                                               setattr(state, "gpu", gpu)))
    engine.step()
    assert started == [("gen-a", "0"), ("gen-b", "1")]  # the third waits for a free GPU
