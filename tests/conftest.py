"""Shared fixtures: a real S3-compatible server on loopback (moto's server mode) and isolated caches."""

from __future__ import annotations

import os
import socket

import pytest

# Nothing in the suite may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nor may it start W&B runs because the developer's shell has WANDB_PROJECT set (tests/test_tracking.py turns
# tracking on, offline, where it is under test).
os.environ["EPS_TRACKING"] = "off"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1, spoken to with real boto3 over HTTP."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the loopback S3 server; the store is pointed at it through the environment."""
    import uuid

    import boto3

    from shared.core import store

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store._s3_client.cache_clear()
    bucket = f"eps-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    store._s3_client.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """One cache per test session, never the user's: the tiny model is built once, downloads land here.

    Session-scoped so that module-scoped fixtures (a loaded tokenizer, a generator) already see it.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EPS_CACHE", str(tmp_path_factory.getbasetemp() / "eps-cache"))
        yield


@pytest.fixture(scope="session")
def issue164_tiny_run(tmp_path_factory):
    """One complete issue164 tiny run, made once per test session through the local engine.

    Tests that only read it use it as is; tests that change or break things copy its store folder first
    (``shutil.copytree``), which the stage contract treats as the same results in another place.
    """
    from shared.core import store
    from workflows.__main__ import build_plan, parser
    from workflows.engines.local import run_plan

    root = store.from_path(tmp_path_factory.mktemp("issue164-tiny") / "store")
    args = parser().parse_args(["run", "issue164", "--profile", "tiny", "--store", root, "--run-id", "e2e"])
    plan = build_plan(args)
    result = run_plan(plan, retries=0, live=False)
    logs = {s.task.name: s.log_path.read_text()[-2000:] for s in result.failed() if s.log_path}
    assert result.ok, f"failed tasks: {logs}"
    return plan
