"""The local engine: runs a plan as processes on this machine, with resume, retries and a live progress table.

Each task runs as ``python -m jobs.<stage> --config <file>``, exactly the command its container runs on a cluster
(forked warm from a process that has already imported torch: ``workflows.engines.warm_start``),
in its own process group, under the stage's deadline (``Resources.timeout_s``) and retry count (``Resources.retries``
or the default both engines share). GPU tasks get one visible GPU each while GPUs are free; with no GPU they run on
the CPU. Before a task starts, the engine settles it from the store when it can, as the stage itself would: a
verified complete result of the same work in this run is shown as ``cached``, one from another run is brought over
and shown as ``reused``. SIGINT, SIGTERM or an error in the engine stop every task's process group before it exits.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared.contract import stage as stage_contract
from shared.core import store
from shared.core.config import ConfigError
from workflows.engines import warm_start
from workflows.plan import Plan, Task

PENDING, RUNNING, DONE, CACHED, REUSED, FAILED, BLOCKED = (
    "pending", "running", "done", "cached", "reused", "failed", "blocked")
COMPLETE = {DONE, CACHED, REUSED}
FINISHED = COMPLETE | {FAILED, BLOCKED}
STYLE = {PENDING: "dim", RUNNING: "yellow", DONE: "green", CACHED: "cyan", REUSED: "blue", FAILED: "bold red",
         BLOCKED: "red"}
STOP_GRACE_S = 10.0  # after SIGTERM, how long a task may take to release its lease and copy its log


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
    # absolute: tasks run from the repository root, which need not be where the command was given
    return (Path("artifacts") / "local-runs" / plan.run_id).resolve()


@dataclass
class TaskState:
    task: Task
    status: str = PENDING
    attempts: int = 0
    started: float | None = None
    attempt_started: float | None = None
    finished: float | None = None
    process: subprocess.Popen | warm_start.WarmProcess | None = None
    gpu: str | None = None
    last_line: str = ""
    log_path: Path | None = None
    log_offset: int = 0  # where the current attempt's lines start in the log
    uses_gpu: bool = field(default=False)
    warnings: list[str] = field(default_factory=list)

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
        return all(s.status in COMPLETE for s in self.states.values())

    def failed(self) -> list[TaskState]:
        return [s for s in self.states.values() if s.status in (FAILED, BLOCKED)]

    def warnings(self) -> list[str]:
        return [f"task {s.task.name}: {w}" for s in self.states.values() for w in s.warnings]


def _attempt_lines(path: Path, offset: int) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = [ln for ln in fh.read().decode(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
        return lines[-1].strip()[:120] if lines else ""
    except OSError:
        return ""


def _stop_group(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM a task's whole process group, then SIGKILL whatever is left after ``grace_s``."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.time() + grace_s
    while time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stragglers (workers the stage started) go too
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _die_with(engine_pid: int):
    """For a task's process, before it runs: a SIGTERM when the engine's process ends (Linux ``PR_SET_PDEATHSIG``),
    so a killed engine (``kill -9`` of its process group) leaves no stage writing on without it."""
    if not sys.platform.startswith("linux"):
        return None
    return functools.partial(warm_start.die_with_parent, engine_pid)


class Terminated(KeyboardInterrupt):
    """SIGTERM to the engine: unwind like Ctrl-C."""


class LocalEngine:
    def __init__(self, plan: Plan, *, retries: int | None = None, cpu_parallel: int | None = None,
                 live: bool | None = None, poll_s: float = 0.2):
        self.plan = plan
        self.retries = retries  # None: each stage's own count, as on the cluster
        self.gpus = visible_gpus()
        if cpu_parallel is not None and cpu_parallel < 1:
            raise ConfigError(f"parallel must be at least 1 (got {cpu_parallel}): no task could ever start")
        self.cpu_parallel = cpu_parallel or max(1, min(2, os.cpu_count() or 1))
        self.threads_per_cpu_task = max(1, (os.cpu_count() or 1) // self.cpu_parallel)
        self.live = sys.stdout.isatty() if live is None else live
        self.poll_s = poll_s
        self.folder = run_folder(plan)
        self.states = {t.name: TaskState(t, uses_gpu=t.spec.resources.uses_gpu) for t in plan.tasks}
        self._warm: warm_start.WarmServer | bool | None = None

    def retries_of(self, task: Task) -> int:
        if self.retries is not None:
            return self.retries
        own = task.spec.resources.retries
        return stage_contract.DEFAULT_RETRIES if own is None else own

    # -- scheduling ---------------------------------------------------------------------------------------------

    def _ready(self) -> list[TaskState]:
        ready = []
        for state in self.states.values():
            if state.status != PENDING:
                continue
            deps = [self.states[d].status for d in state.task.after]
            if any(d in (FAILED, BLOCKED) for d in deps):
                state.status, state.last_line = BLOCKED, "an upstream task failed"
            elif all(d in COMPLETE for d in deps):
                ready.append(state)
        return ready

    def _free_gpu(self) -> str | None:
        busy = {s.gpu for s in self.states.values() if s.status == RUNNING}
        return next((g for g in self.gpus if g not in busy), None)

    def _cpu_slots_free(self) -> int:
        running = [s for s in self.states.values() if s.status == RUNNING and s.gpu is None]
        return self.cpu_parallel - len(running)

    def _env(self, gpu: str | None) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else ""
        if gpu is None and "OMP_NUM_THREADS" not in os.environ:
            # CPU tasks share the cores: more threads than cores makes every parallel task slower
            env["OMP_NUM_THREADS"] = str(self.threads_per_cpu_task)
        if store.normalize_root(self.plan.store).startswith("file://"):
            env["EPS_LOG_COPY"] = "0"  # the task's log is already in the store, under the run's _local folder
        # what a pod on the cluster is told too (shared.contract.tracking tags its runs with them)
        env |= {"EPS_EXPERIMENT": self.plan.workflow, "EPS_PROFILE": self.plan.profile, "EPS_RUN_ID": self.plan.run_id}
        if self.plan.tracking:
            env["EPS_TRACKING"] = self.plan.tracking
        env.setdefault("WANDB_DIR", str(self.folder))  # offline W&B runs stay beside the run's logs
        return env

    def _start(self, state: TaskState, gpu: str | None) -> None:
        task = state.task
        config_path = self.folder / "configs" / f"{task.name}.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(task.config, indent=2, sort_keys=True))
        state.log_path = self.folder / "logs" / f"{task.name}.log"
        state.log_path.parent.mkdir(parents=True, exist_ok=True)
        state.attempts += 1
        state.gpu = gpu
        state.started = state.started or time.time()
        state.attempt_started = time.time()
        state.status = RUNNING
        with open(state.log_path, "a") as log:
            log.write(f"\n=== attempt {state.attempts} of {task.name} ({task.stage}) ===\n")
            log.flush()
            state.log_offset = log.tell()
            args, root = ["--config", str(config_path)], str(Path(__file__).resolve().parents[2])
            # GPU tasks start cold: a process that may have touched the CUDA driver cannot hand a GPU to a fork,
            # and next to minutes on a GPU, ten seconds of imports do not matter
            server = self._warm_server() if gpu is None else None
            if server is not None:
                state.process = server.start(task.spec.module, args, env=self._env(gpu), cwd=root,
                                             log=str(state.log_path))
                return
            state.process = subprocess.Popen(
                [sys.executable, "-m", task.spec.module, *args],
                stdout=log, stderr=subprocess.STDOUT, env=self._env(gpu), cwd=root,
                start_new_session=True,  # its own process group: stopped as a whole, never orphaned
                preexec_fn=_die_with(os.getpid()),  # and SIGTERM when the engine dies, however it dies
            )

    def _warm_server(self) -> warm_start.WarmServer | None:
        """The server that forks tasks with torch already imported (started on first use), or None: turned off
        (``EPS_WARM_START=0``) or failed to start, and then every task is a fresh interpreter."""
        if self._warm is None:
            self._warm = False
            if warm_start.enabled():
                try:
                    self._warm = warm_start.WarmServer(cwd=str(Path(__file__).resolve().parents[2]))
                except OSError as err:
                    print(f"warning: tasks start cold ({err})", file=sys.stderr)
        return self._warm or None

    def _finish_attempt(self, state: TaskState, code: int | None, timed_out: bool = False) -> None:
        lines = _attempt_lines(state.log_path, state.log_offset) if state.log_path else []
        state.warnings += [ln for ln in lines if ln.startswith("warning:")]
        errors = [ln for ln in lines if ln.startswith("error:")]
        state.process, state.gpu = None, None
        if timed_out:
            state.last_line = f"timed out after {state.task.spec.resources.timeout_s}s (the stage's timeout_s)"
        elif errors:
            state.last_line = errors[-1][:300]
        if code == 0 and not timed_out:
            state.status, state.finished = DONE, time.time()
            # the stage may have settled itself (another run finished it while this one waited for its lease)
            if any("reused (" in ln for ln in lines):
                state.status = REUSED
            elif any("skipping (cached)" in ln for ln in lines):
                state.status = CACHED
        elif code == 2 or state.attempts > self.retries_of(state.task):
            # exit 2 is bad input: retrying cannot help
            state.status, state.finished = FAILED, time.time()
        else:
            state.status = PENDING  # retried on the next tick

    def _poll(self, state: TaskState) -> None:
        state.last_line = _last_line(state.log_path) if state.log_path else ""
        code = state.process.poll() if state.process else None
        if code is None:
            timeout = state.task.spec.resources.timeout_s
            if state.process and state.attempt_started and time.time() - state.attempt_started > timeout:
                _stop_group(state.process)
                self._finish_attempt(state, None, timed_out=True)
            return
        self._finish_attempt(state, code)

    def _settle(self, state: TaskState) -> bool:
        settled = state.task.settle()
        if settled is None:
            return False
        state.status = CACHED if settled.how == stage_contract.CACHED else REUSED
        source = settled.manifest.get("reused_from") or {}
        state.last_line = ("complete result verified" if state.status == CACHED else
                           f"from run {source.get('run_id')} ({source.get('mode')})")
        return True

    def step(self) -> None:
        for state in self.states.values():
            if state.status == RUNNING:
                self._poll(state)
        for state in self._ready():
            if state.attempts == 0 and self._settle(state):
                continue
            if state.uses_gpu and self.gpus:
                gpu = self._free_gpu()
                if gpu is not None:
                    self._start(state, gpu)
            elif self._cpu_slots_free() > 0:
                self._start(state, None)

    def finished(self) -> bool:
        return all(s.status in FINISHED for s in self.states.values())

    def stop_all(self) -> None:
        """Stop every running task's process group (SIGTERM, then SIGKILL after a grace period)."""
        for state in self.states.values():
            if state.process is not None:
                _stop_group(state.process)
                state.process = None
                if state.status == RUNNING:
                    state.status, state.last_line = FAILED, "stopped"

    # -- display ------------------------------------------------------------------------------------------------

    def table(self):
        from rich.markup import escape
        from rich.table import Table

        counts = {k: sum(s.status == k for s in self.states.values()) for k in (DONE, CACHED, REUSED)}
        detail = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        title = (f"{self.plan.workflow} [{self.plan.profile}] run {self.plan.run_id}: "
                 f"{sum(counts.values())}/{len(self.states)} complete" + (f" ({detail})" if detail else ""))
        table = Table(title=escape(title), expand=False)
        for col in ("task", "stage", "status", "try", "time", "last output"):
            table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=70 if col == "last output" else None)
        for s in self.states.values():
            table.add_row(s.task.name, s.task.stage, f"[{STYLE[s.status]}]{s.status}[/]", str(s.attempts or ""),
                          s.elapsed, escape(s.last_line) if s.status != DONE else "")
        return table

    def _loop(self) -> None:
        if self.live:
            from rich.live import Live

            with Live(self.table(), refresh_per_second=4) as live:
                while not self.finished():
                    self.step()
                    live.update(self.table())
                    time.sleep(self.poll_s)
            return
        seen: dict[str, str] = {}
        while not self.finished():
            self.step()
            for name, s in self.states.items():
                if seen.get(name) != s.status:
                    seen[name] = s.status
                    print(f"{time.strftime('%H:%M:%S')} {name:<40} {s.status:<8} {s.elapsed}", flush=True)
            time.sleep(self.poll_s)

    def run(self) -> RunResult:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "plan.json").write_text(self.plan.model_dump_json(indent=2))

        def on_sigterm(_signum, _frame):
            raise Terminated()

        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
        try:
            self._loop()
        finally:
            self.stop_all()  # on success nothing runs; on Ctrl-C, SIGTERM or an engine error every task stops
            if self._warm:
                self._warm.close()
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
        return RunResult(self.plan, self.states, self.folder)


def run_plan(plan: Plan, **kwargs) -> RunResult:
    return LocalEngine(plan, **kwargs).run()
