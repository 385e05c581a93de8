"""The local engine: runs a plan as processes on this machine, with resume, retries and a live progress table.

Each task runs as ``python -m jobs.<stage> --config <file>``, exactly the command its container runs on a cluster.
GPU tasks get one visible GPU each while GPUs are free; with no GPU they run on the CPU. A task whose stage already
has a complete manifest for the same config and inputs is shown as ``cached`` and not started again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared import stage as stage_contract
from shared import store
from workflows.plan import Plan, Task

PENDING, RUNNING, DONE, CACHED, FAILED, BLOCKED = "pending", "running", "done", "cached", "failed", "blocked"
FINISHED = {DONE, CACHED, FAILED, BLOCKED}
STYLE = {PENDING: "dim", RUNNING: "yellow", DONE: "green", CACHED: "cyan", FAILED: "bold red", BLOCKED: "red"}


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def run_folder(plan: Plan) -> Path:
    """Where configs and logs of a local run live: beside the artifacts for a local store."""
    root = store.normalize_root(plan.store)
    if root.startswith("file://"):
        return Path(unquote(urlparse(root).path)) / "runs" / plan.run_id / "_local"
    return Path("artifacts") / "local-runs" / plan.run_id


@dataclass
class TaskState:
    task: Task
    status: str = PENDING
    attempts: int = 0
    started: float | None = None
    finished: float | None = None
    process: subprocess.Popen | None = None
    gpu: str | None = None
    last_line: str = ""
    log_path: Path | None = None
    uses_gpu: bool = field(default=False)

    @property
    def elapsed(self) -> str:
        if self.started is None:
            return ""
        return f"{(self.finished or time.time()) - self.started:6.1f}s"


@dataclass
class RunResult:
    plan: Plan
    states: dict[str, TaskState]
    folder: Path

    @property
    def ok(self) -> bool:
        return all(s.status in (DONE, CACHED) for s in self.states.values())

    def failed(self) -> list[TaskState]:
        return [s for s in self.states.values() if s.status in (FAILED, BLOCKED)]


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = [ln for ln in fh.read().decode(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
        return lines[-1].strip()[:120] if lines else ""
    except OSError:
        return ""


def already_complete(task: Task) -> bool:
    cfg = task.parsed_config()
    try:
        inputs = stage_contract.input_hashes(cfg)
    except stage_contract.StageInputError:
        return False
    return stage_contract.complete_manifest(task.output_prefix(), cfg, inputs) is not None


class LocalEngine:
    def __init__(self, plan: Plan, *, retries: int = 1, cpu_parallel: int | None = None, live: bool | None = None,
                 poll_s: float = 0.2):
        self.plan = plan
        self.retries = retries
        self.gpus = visible_gpus()
        self.cpu_parallel = cpu_parallel or max(1, min(2, os.cpu_count() or 1))
        self.threads_per_cpu_task = max(1, (os.cpu_count() or 1) // self.cpu_parallel)
        self.live = sys.stdout.isatty() if live is None else live
        self.poll_s = poll_s
        self.folder = run_folder(plan)
        self.states = {t.name: TaskState(t, uses_gpu=t.spec.resources.uses_gpu) for t in plan.tasks}

    # -- scheduling ---------------------------------------------------------------------------------------------

    def _ready(self) -> list[TaskState]:
        ready = []
        for state in self.states.values():
            if state.status != PENDING:
                continue
            deps = [self.states[d].status for d in state.task.after]
            if any(d in (FAILED, BLOCKED) for d in deps):
                state.status, state.last_line = BLOCKED, "an upstream task failed"
            elif all(d in (DONE, CACHED) for d in deps):
                ready.append(state)
        return ready

    def _free_gpu(self) -> str | None:
        busy = {s.gpu for s in self.states.values() if s.status == RUNNING}
        return next((g for g in self.gpus if g not in busy), None)

    def _cpu_slots_free(self) -> int:
        running = [s for s in self.states.values() if s.status == RUNNING and s.gpu is None]
        return self.cpu_parallel - len(running)

    def _start(self, state: TaskState, gpu: str | None) -> None:
        task = state.task
        config_path = self.folder / "configs" / f"{task.name}.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(task.config, indent=2, sort_keys=True))
        state.log_path = self.folder / "logs" / f"{task.name}.log"
        state.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else ""
        if gpu is None and "OMP_NUM_THREADS" not in os.environ:
            # CPU tasks share the cores: more threads than cores makes every parallel task slower
            env["OMP_NUM_THREADS"] = str(self.threads_per_cpu_task)
        state.attempts += 1
        state.gpu = gpu
        state.started = state.started or time.time()
        state.status = RUNNING
        log = open(state.log_path, "a")
        log.write(f"\n=== attempt {state.attempts} of {task.name} ({task.stage}) ===\n")
        log.flush()
        state.process = subprocess.Popen(
            [sys.executable, "-m", task.spec.module, "--config", str(config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[2],
        )
        log.close()

    def _poll(self, state: TaskState) -> None:
        state.last_line = _last_line(state.log_path) if state.log_path else ""
        code = state.process.poll() if state.process else None
        if code is None:
            return
        state.process = None
        if code == 0:
            state.status, state.finished = DONE, time.time()
        elif code == 2 or state.attempts > self.retries:
            # exit 2 is bad input: retrying cannot help
            state.status, state.finished = FAILED, time.time()
        else:
            state.status = PENDING  # retried on the next tick
        state.gpu = None

    def step(self) -> None:
        for state in self.states.values():
            if state.status == RUNNING:
                self._poll(state)
        for state in self._ready():
            if state.attempts == 0 and already_complete(state.task):
                state.status, state.last_line = CACHED, "complete manifest found"
                continue
            if state.uses_gpu and self.gpus:
                gpu = self._free_gpu()
                if gpu is not None:
                    self._start(state, gpu)
            elif self._cpu_slots_free() > 0:
                self._start(state, None)

    def finished(self) -> bool:
        return all(s.status in FINISHED for s in self.states.values())

    # -- display ------------------------------------------------------------------------------------------------

    def table(self):
        from rich.table import Table

        done = sum(s.status in (DONE, CACHED) for s in self.states.values())
        table = Table(title=f"{self.plan.workflow} [{self.plan.profile}] run {self.plan.run_id}: "
                            f"{done}/{len(self.states)} done", expand=False)
        for col in ("task", "stage", "status", "try", "time", "last output"):
            table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=70 if col == "last output" else None)
        for s in self.states.values():
            table.add_row(s.task.name, s.task.stage, f"[{STYLE[s.status]}]{s.status}[/]", str(s.attempts or ""),
                          s.elapsed, s.last_line if s.status != DONE else "")
        return table

    def run(self) -> RunResult:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "plan.json").write_text(self.plan.model_dump_json(indent=2))
        try:
            if self.live:
                from rich.live import Live

                with Live(self.table(), refresh_per_second=4) as live:
                    while not self.finished():
                        self.step()
                        live.update(self.table())
                        time.sleep(self.poll_s)
            else:
                seen: dict[str, str] = {}
                while not self.finished():
                    self.step()
                    for name, s in self.states.items():
                        if seen.get(name) != s.status:
                            seen[name] = s.status
                            print(f"{time.strftime('%H:%M:%S')} {name:<40} {s.status:<8} {s.elapsed}", flush=True)
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            for s in self.states.values():
                if s.process:
                    s.process.terminate()
            raise
        return RunResult(self.plan, self.states, self.folder)


def run_plan(plan: Plan, **kwargs) -> RunResult:
    return LocalEngine(plan, **kwargs).run()
