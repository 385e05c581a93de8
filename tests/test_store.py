"""The store behaves the same over file:// and a real S3-compatible server."""

from __future__ import annotations

import hashlib
import os

import pytest

from shared import store


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "file":
        return store.from_path(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_bytes_round_trip_and_sha256(root):
    uri = store.join(root, "a", "b.bin")
    digest = store.write_bytes(uri, b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert store.read_bytes(uri) == b"hello"
    assert store.exists(uri)
    assert store.sha256(uri) == digest


def test_json_jsonl_and_listing(root):
    store.write_json(store.join(root, "x", "one.json"), {"b": 1, "a": [1, 2]})
    store.write_jsonl(store.join(root, "x", "rows.jsonl"), [{"i": 1}, {"i": 2}])
    assert store.read_json(store.join(root, "x", "one.json")) == {"a": [1, 2], "b": 1}
    assert store.read_jsonl(store.join(root, "x", "rows.jsonl")) == [{"i": 1}, {"i": 2}]
    assert store.list_uris(store.join(root, "x")) == [store.join(root, "x", "one.json"), store.join(root, "x", "rows.jsonl")]
    assert store.list_uris(store.join(root, "nothing-here")) == []


def test_folder_upload_download_and_folder_hash(root, tmp_path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(os.urandom(1000))
    uploaded = store.upload_dir(src, store.join(root, "adapter"))
    assert len(uploaded) == 2
    out = store.download_dir(store.join(root, "adapter"), tmp_path / "copy")
    assert (out / "sub" / "w.bin").read_bytes() == (src / "sub" / "w.bin").read_bytes()
    before = store.sha256(store.join(root, "adapter"))
    store.write_bytes(store.join(root, "adapter", "sub", "w.bin"), b"changed")
    assert store.sha256(store.join(root, "adapter")) != before


def test_tensors_and_arrays(root):
    import numpy as np
    import torch

    store.write_tensors(store.join(root, "t.safetensors"), {"w": torch.arange(6.0).reshape(2, 3)})
    assert torch.equal(store.read_tensors(store.join(root, "t.safetensors"))["w"], torch.arange(6.0).reshape(2, 3))
    store.write_npz(store.join(root, "a.npz"), x=np.ones((2, 2)))
    assert store.read_npz(store.join(root, "a.npz"))["x"].sum() == 4


def test_missing_artifact_is_one_readable_error(root):
    with pytest.raises(store.StoreError, match="not found|NoSuchKey|404"):
        store.read_bytes(store.join(root, "missing.json"))
    assert not store.exists(store.join(root, "missing.json"))


def test_local_writes_are_atomic(tmp_path, monkeypatch):
    uri = store.from_path(tmp_path / "f.json")
    store.write_bytes(uri, b"old")

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_bytes(uri, b"new")
    assert (tmp_path / "f.json").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_unreachable_s3_endpoint_is_one_readable_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store._s3_client.cache_clear()
    from botocore.config import Config

    monkeypatch.setattr(store, "_s3_client", lambda endpoint: __import__("boto3").client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1)))
    with pytest.raises(store.StoreError) as err:
        store.write_bytes("s3://bucket/key.json", b"{}")
    assert "unreachable" in str(err.value) and "\n" not in str(err.value)


def test_unsupported_scheme_is_rejected():
    with pytest.raises(store.StoreError, match="unsupported"):
        store.read_bytes("gs://bucket/x")
