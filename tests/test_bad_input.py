"""Bad input anywhere gives one readable error line, a non-zero exit and no manifest for the failed stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shared import store

REPO = Path(__file__).resolve().parents[1]


def run_stage(stage: str, config: dict, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"jobs.{stage}", "--config", json.dumps(config)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, timeout=300,
    )


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def completions(tmp_path) -> tuple[str, str]:
    root = store.from_path(tmp_path / "store")
    uri = store.join(root, "inputs", "completions.jsonl")
    store.write_jsonl(uri, [{"condition": "c", "question_id": "q", "question": "Hi?", "sample": 0, "text": "Hello."}])
    return root, uri


def test_anthropic_judge_without_api_key(tmp_path):
    root, uri = completions(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.judge", "--config", json.dumps({
            "store": root, "run_id": "r", "cell": "c", "completions_uri": uri, "judge_name": "sonnet",
            "judge": {"kind": "anthropic", "model": "claude-sonnet-4-5-20250929"}})],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "ANTHROPIC_API_KEY" in error_lines(proc)[0]
    assert "Traceback" not in proc.stderr
    assert not store.exists(store.join(root, "runs", "r", "c", "judge", "manifest.json"))


def test_unreachable_s3_endpoint(tmp_path):
    proc = run_stage("judge", {
        "store": "s3://eps-bucket/root", "run_id": "r", "cell": "c", "judge_name": "local",
        "completions_uri": "s3://eps-bucket/root/inputs/completions.jsonl",
        "judge": {"kind": "local", "model": "tiny:qwen2"}},
        AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
        AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(error_lines(proc)) == 1 and "unreachable" in error_lines(proc)[0]
    assert "Traceback" not in proc.stderr


def test_a_bad_config_field(tmp_path):
    root, uri = completions(tmp_path)
    proc = run_stage("generate", {"store": root, "run_id": "r", "cell": "c", "condition": "c",
                                  "model_ref": "tiny:qwen2", "questions": [], "n": "several"})
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "n:" in error_lines(proc)[0]
    assert not store.list_uris(store.join(root, "runs"))


def test_an_unknown_workflow_and_profile_from_make():
    for args, message in ((["WORKFLOW=issue999"], "unknown workflow"), (["PROFILE=huge"], "unknown profile")):
        # ARGS is emptied and MAKEFLAGS dropped so that a caller's `make test ARGS=...` cannot leak in
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")}
        proc = subprocess.run(["make", "-s", "run", *args, "ARGS="], capture_output=True, text=True, cwd=REPO,
                              env=env, timeout=300)
        assert proc.returncode != 0
        assert message in proc.stderr
