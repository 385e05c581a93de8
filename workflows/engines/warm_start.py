"""Task processes that start warm: forked from one process that has already imported torch and transformers.

A stage's process spends ~10 s of CPU importing torch, transformers and peft before it reads its config; a plan of a
hundred tasks spends a quarter of an hour of CPU on imports alone. The local engine starts one server per run
(``python -m workflows.engines.warm_start``), which imports those libraries once and then forks a child per task:

- the child is what ``subprocess.Popen([python, -m, module, --config, file], start_new_session=True)`` would have
  been: its own session and process group, the task's environment, working folder and log as stdout and stderr,
  ``sys.argv`` as the command line, the stage's module run as ``__main__``, the stage's exit status;
- the server dies with the engine and every child dies with the server (``PR_SET_PDEATHSIG``), so a killed engine
  leaves no stage writing on;
- nothing here starts a thread before forking (a fork copies only the forking thread), and each child sets
  torch's thread count from its own ``OMP_NUM_THREADS`` (OpenMP read the server's at import);
- only CPU tasks start warm: the server runs with no visible GPU, and the engine starts GPU tasks as fresh
  interpreters (a CUDA driver initialised before a fork cannot serve the child).

Requests go to the server's stdin and answers come back on its stdout, one JSON object a line:
``{"start": {...}}`` -> ``{"pid": N}``; and, whenever a child ends, ``{"exit": N, "code": C}`` (C as ``Popen``
reports it: negative for a signal). ``EPS_WARM_START=0`` turns this off (each task a fresh interpreter).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

PRELOAD = ("torch", "transformers", "peft", "safetensors")
PR_SET_PDEATHSIG = 1


def enabled() -> bool:
    return os.environ.get("EPS_WARM_START", "1") != "0" and sys.platform.startswith("linux")


def die_with_parent(parent_pid: int) -> None:
    """In a child, before it runs: SIGTERM when ``parent_pid`` ends (Linux ``PR_SET_PDEATHSIG``)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


# -- the server side ----------------------------------------------------------------------------------------------


def _run_child(request: dict, server_pid: int) -> None:
    """In the forked child: become the task's process, run its module, never return."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        die_with_parent(server_pid)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the server's stdin is the request pipe
        os.close(devnull)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # unbuffered as PYTHONUNBUFFERED would make it
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        threads = request["env"].get("OMP_NUM_THREADS")
        if threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))
        sys.argv = [request["module"], *request["args"]]
        sys.path[0] = request["cwd"]
        import runpy

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if not isinstance(done.code, int | None):
            print(done.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the child reports it the way an interpreter would, then exits
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            _shut_down_like_an_interpreter()
        finally:
            os._exit(code)


def _shut_down_like_an_interpreter() -> None:
    """What an interpreter does at exit and ``os._exit`` skips: wait for non-daemon threads, run atexit handlers
    (logging's flush, W&B's finish), flush the streams."""
    import atexit

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()


def serve() -> None:
    """The server loop: read start requests, fork, report each child's pid and, later, its exit status."""
    engine_pid = int(os.environ.pop("EPS_WARM_START_ENGINE", "0")) or os.getppid()
    die_with_parent(engine_pid)
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    if "transformers" in sys.modules:  # the lazy module: import what every causal-LM stage touches
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    out = sys.stdout
    server_pid = os.getpid()
    requests = os.fdopen(sys.stdin.fileno(), "rb", buffering=0)
    pending = b""
    children: set[int] = set()
    print(json.dumps({"ready": server_pid}), file=out, flush=True)
    while True:
        readable, _, _ = select.select([requests], [], [], 0.05)
        if readable:
            chunk = requests.read(65536)
            if not chunk:  # the engine closed the pipe: it is done with us
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)["start"]
                pid = os.fork()
                if pid == 0:
                    _run_child(request, server_pid)
                children.add(pid)
                print(json.dumps({"pid": pid}), file=out, flush=True)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                print(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}), file=out, flush=True)


# -- the engine side ----------------------------------------------------------------------------------------------


class WarmServer:
    """The engine's handle on the server: ``start`` returns a process object the engine polls like a ``Popen``."""

    def __init__(self, python: str = sys.executable, cwd: str | None = None):
        env = {**os.environ, "EPS_WARM_START_ENGINE": str(os.getpid()), "PYTHONUNBUFFERED": "1"}
        env.setdefault("CUDA_VISIBLE_DEVICES", "")  # the server never needs a GPU; a child sets its own
        self._server = subprocess.Popen(
            [python, "-m", "workflows.engines.warm_start"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=cwd, env=env,
        )
        self._lock = threading.Lock()
        self._codes: dict[int, int] = {}
        self._pids: list[int] = []
        self._pid_ready = threading.Condition(self._lock)
        self._alive = True
        first = self._server.stdout.readline()
        if not first.startswith(b'{"ready"'):
            self.close()
            raise OSError("the warm-start server did not start")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._server.stdout:
            message = json.loads(line)
            with self._lock:
                if "pid" in message:
                    self._pids.append(message["pid"])
                    self._pid_ready.notify_all()
                elif "exit" in message:
                    self._codes[message["exit"]] = message["code"]
        with self._lock:  # the server is gone: its children got SIGTERM from the kernel
            self._alive = False
            self._pid_ready.notify_all()

    def start(self, module: str, args: list[str], *, env: dict, cwd: str, log: str) -> WarmProcess:
        request = {"start": {"module": module, "args": args, "env": env, "cwd": cwd, "log": log}}
        with self._lock:
            if not self._alive:
                raise OSError("the warm-start server has ended")
            self._server.stdin.write((json.dumps(request) + "\n").encode())
            self._server.stdin.flush()
            while not self._pids and self._alive:
                self._pid_ready.wait(timeout=30)
            if not self._pids:
                raise OSError("the warm-start server ended before starting the task")
            return WarmProcess(self, self._pids.pop(0))

    def code_of(self, pid: int) -> int | None:
        with self._lock:
            if pid in self._codes:
                return self._codes[pid]
            return None if self._alive else -signal.SIGTERM

    def close(self) -> None:
        try:
            self._server.stdin.close()
        except OSError:
            pass
        try:
            self._server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()


class WarmProcess:
    """What the engine needs of ``subprocess.Popen`` for a task forked by the server."""

    def __init__(self, server: WarmServer, pid: int):
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.code_of(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(self.pid, timeout)
            time.sleep(0.02)
        return self.returncode


if __name__ == "__main__":
    serve()
