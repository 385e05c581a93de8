"""Tasks forked from the warm-start server behave as the fresh interpreter they replace: their own environment,
folder, arguments, session and log; the exit status an interpreter would give; and no task outlives the server."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.fakes.processes import alive
from workflows.engines.warm_start import WarmServer

ROOT = Path(__file__).resolve().parents[1]
MODULE = "tests.fakes.warm_probe"


@pytest.fixture(scope="module")
def server():
    warm = WarmServer(cwd=str(ROOT))
    yield warm
    warm.close()


def start(server, how, tmp_path, **env):
    log = tmp_path / f"{how}.log"
    task_env = {**os.environ, "PROBE": how, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    return server.start(MODULE, [how], env=task_env, cwd=str(ROOT), log=str(log)), log


def report(log: Path) -> dict:
    return json.loads(log.read_text().splitlines()[0])


def test_a_task_gets_its_own_environment_arguments_threads_and_session(server, tmp_path):
    process, log = start(server, "ok", tmp_path, OMP_NUM_THREADS="1")
    assert process.wait(timeout=60) == 0
    seen = report(log)
    assert seen["argv"] == ["ok"] and seen["probe"] == "ok" and seen["cuda"] == ""
    assert seen["cwd"] == str(ROOT) and seen["session_leader"]
    assert seen["threads"] == 1  # set from the task's OMP_NUM_THREADS, not the server's
    assert seen["torch_was_warm"]


def test_the_exit_status_is_the_one_an_interpreter_gives(server, tmp_path):
    bad_input, _ = start(server, "exit2", tmp_path)
    crash, crash_log = start(server, "raise", tmp_path)
    killed, _ = start(server, "sleep", tmp_path)
    assert bad_input.wait(timeout=60) == 2
    assert crash.wait(timeout=60) == 1
    assert "RuntimeError: the probe failed on purpose" in crash_log.read_text()  # the traceback is in the log
    time.sleep(0.5)
    os.killpg(killed.pid, signal.SIGTERM)  # the task leads its own process group, as with start_new_session
    assert killed.wait(timeout=60) == -signal.SIGTERM


def test_no_task_outlives_the_server(tmp_path):
    warm = WarmServer(cwd=str(ROOT))
    process, log = start(warm, "sleep", tmp_path)
    deadline = time.time() + 60
    while not log.exists() or not log.read_text():
        assert time.time() < deadline, "the task never started"
        time.sleep(0.05)
    warm._server.kill()  # as when the engine's process group is killed with the server in it
    deadline = time.time() + 30
    while alive(process.pid):
        assert time.time() < deadline, "the task outlived its server"
        time.sleep(0.05)
    assert process.poll() is not None  # the engine sees it ended


def test_the_bench_table_prints_the_stored_measurements():
    from bench.warm_start import table

    stored = json.loads((ROOT / "bench" / "results" / "warm_start.json").read_text())
    text = table(stored)
    for row in stored["rows"]:
        assert f"{row['cpu_s']:.1f} s" in text and f"{row['wall_s']:.1f} s" in text
    assert (ROOT / "bench" / "results" / "warm_start.md").read_text() == text  # the committed table is generated
