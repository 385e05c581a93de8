"""The local engine: dependency order, cached and reused stages, failures block only their dependents, retries,
deadlines, and every task's process group stopped when the engine stops."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.core import store
from tests.fakes.processes import alive
from workflows.engines.local import BLOCKED, CACHED, DONE, FAILED, PENDING, REUSED, LocalEngine, run_plan
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
    builder.add("score-after-bad", "score_classifier", "x",
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


def test_finished_tasks_are_cached_on_the_next_run_and_reused_by_a_new_run_id(builder, tmp_path):
    gen(builder, "gen-a")
    plan = builder.plan({})
    assert run_plan(plan, live=False).ok
    again = run_plan(plan, live=False)
    assert again.states["gen-a"].status == CACHED and again.states["gen-a"].attempts == 0
    other = PlanBuilder("issue164", "tiny", "another-run", builder.store)
    gen(other, "gen-a")
    reused = run_plan(other.plan({}), live=False)
    assert reused.states["gen-a"].status == REUSED and reused.states["gen-a"].attempts == 0
    assert "another-run" in reused.states["gen-a"].task.output_prefix()
    assert store.exists(reused.states["gen-a"].task.output_uri("completions.jsonl"))


class FakeProcess:
    def __init__(self, code):
        self.code = code

    def poll(self):
        return self.code


def test_each_stage_gets_the_retry_count_both_engines_use(builder):
    from shared.contract.stage import DEFAULT_RETRIES
    from workflows.engines.argo_settings import RetrySettings

    gen(builder, "gen-a")
    engine = LocalEngine(builder.plan({}), live=False)
    assert engine.retries_of(engine.states["gen-a"].task) == DEFAULT_RETRIES == RetrySettings().limit
    assert LocalEngine(builder.plan({}), retries=0, live=False).retries_of(engine.states["gen-a"].task) == 0


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


def test_cpu_tasks_start_warm_and_gpu_tasks_start_cold(builder, monkeypatch):
    from workflows.engines.warm_start import WarmProcess

    started = {}

    def run_recording_starts(plan, *, uses_gpu: bool):
        engine = LocalEngine(plan, live=False)
        original = engine._start

        def spy(state, gpu):
            original(state, gpu)
            started[gpu] = type(state.process)

        monkeypatch.setattr(engine, "_start", spy)
        for state in engine.states.values():
            state.uses_gpu = uses_gpu
        return engine.run()

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one "GPU": the generate stage falls back to the CPU here
    gen(builder, "gen-gpu")
    run_recording_starts(builder.plan({}), uses_gpu=True)
    cpu_builder = PlanBuilder("issue164", "tiny", "engine-test-cpu", builder.store)
    gen(cpu_builder, "gen-cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert run_recording_starts(cpu_builder.plan({}), uses_gpu=False).ok
    assert started == {"0": subprocess.Popen, None: WarmProcess}


def test_a_task_past_its_deadline_is_stopped_and_retried_like_on_the_cluster(builder, monkeypatch):
    task = gen(builder, "gen-slow")
    spec = task.spec
    # a deadline no stage can meet (a warm-started tiny stage can end within a second), checked every 10 ms
    monkeypatch.setattr(spec, "resources", spec.resources.model_copy(update={"timeout_s": 0.001, "retries": 1}))
    result = run_plan(builder.plan({}), live=False, poll_s=0.01)
    state = result.states["gen-slow"]
    assert state.status == FAILED and state.attempts == 2  # the first timeout was retried once
    assert "timed out after 0.001s" in state.last_line
    assert not store.exists(task.output_uri("manifest.json"))


def test_an_engine_error_stops_every_running_task_group(builder, monkeypatch):
    gen(builder, "gen-a")
    engine = LocalEngine(builder.plan({}), live=False, poll_s=0.05)
    real_step, started = engine.step, []

    def step_then_fail():
        real_step()
        running = [s.process.pid for s in engine.states.values() if s.process]
        if running:
            started.extend(running)
            time.sleep(0.5)  # the task is under way (importing) when the engine fails
            raise RuntimeError("the engine broke")

    monkeypatch.setattr(engine, "step", step_then_fail)
    with pytest.raises(RuntimeError, match="engine broke"):
        engine.run()
    assert started and not any(alive(pid) for pid in started)
    assert engine.states["gen-a"].status == FAILED and engine.states["gen-a"].process is None


def test_sigterm_to_the_engine_stops_its_tasks(builder):
    gen(builder, "gen-a")
    plan_file = Path(builder.store.removeprefix("file://")).parent / "plan.json"
    plan_file.write_text(builder.plan({}).model_dump_json())
    script = ("import sys; from workflows.plan import Plan; from workflows.engines.local import run_plan; "
              f"run_plan(Plan.model_validate_json(open({str(plan_file)!r}).read()), live=False, poll_s=0.05)")
    engine = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lease = Path(builder.store.removeprefix("file://")) / "runs" / "engine-test" / "gen-a" / "generate.lease.json"
    deadline = time.time() + 120
    while not lease.exists() and time.time() < deadline:  # the stage process holds its lease: it is running
        time.sleep(0.1)
    task_pid = json.loads(lease.read_text())["pid"]
    engine.send_signal(signal.SIGTERM)
    out, _ = engine.communicate(timeout=60)
    assert engine.returncode != 0
    assert not alive(task_pid), out
    assert not lease.exists()  # the stage released its lease on the way out


def test_the_progress_table_tells_reused_from_cached_and_shows_lines_as_written(builder):
    from rich.console import Console

    gen(builder, "gen-a")
    gen(builder, "gen-b")
    engine = LocalEngine(builder.plan({}), live=False)
    engine.states["gen-a"].status, engine.states["gen-a"].last_line = REUSED, "from run r1 (link)"
    engine.states["gen-b"].status, engine.states["gen-b"].last_line = CACHED, "[gen-b/generate] verified"
    console = Console(width=160, record=True, force_terminal=False)
    console.print(engine.table())
    text = console.export_text()
    assert "issue164 [tiny] run engine-test: 2/2 complete (1 cached, 1 reused)" in text
    assert "reused" in text and "from run r1 (link)" in text and "[gen-b/generate] verified" in text
