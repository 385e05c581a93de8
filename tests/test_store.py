"""The store behaves the same over file:// and a real S3-compatible server."""

from __future__ import annotations

import hashlib
import os

import pytest

from shared.core import store


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


@pytest.mark.parametrize("root", ["s3://", "s3:", "s3:/x", "", "file://relative"])
def test_a_store_root_without_a_bucket_or_path_is_one_readable_error(root):
    with pytest.raises(store.StoreError) as err:
        store.normalize_root(root)
    assert "\n" not in str(err.value)


def test_an_unwritable_store_is_said_before_anything_runs(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(store.StoreError, match="not writable") as err:
        store.check_writable(store.from_path(tmp_path / "a-file" / "store"))  # unwritable even for root
    assert "\n" not in str(err.value)
    store.check_writable(store.from_path(tmp_path / "fine"))
    assert [p.name for p in (tmp_path / "fine").iterdir()] == []  # the probe is gone


def test_conditional_writes_create_once_and_replace_only_an_unchanged_version(root):
    uri = store.join(root, "lease.json")
    first = store.put_if_absent(uri, b"a")
    assert first and store.put_if_absent(uri, b"b") is None
    second = store.put_if_match(uri, b"c", first)
    assert second and store.read_bytes(uri) == b"c"
    assert store.put_if_match(uri, b"d", first) is None  # someone else's version: refused
    assert not store.delete_if_match(uri, first) and store.exists(uri)
    assert store.delete_if_match(uri, second) and not store.exists(uri)


def test_copy_move_verify_and_delete_a_folder(root):
    src = store.join(root, "a", "x.bin")
    digest = store.write_bytes(src, b"payload")
    how = store.copy(src, store.join(root, "b", "x.bin"))
    assert how == ("link" if root.startswith("file://") else "copy")
    assert store.verify(store.join(root, "b", "x.bin"), digest)
    store.move(store.join(root, "b", "x.bin"), store.join(root, "c", "y.bin"))
    assert not store.exists(store.join(root, "b", "x.bin")) and store.read_bytes(store.join(root, "c", "y.bin")) == b"payload"
    store.write_bytes(store.join(root, "c", "y.bin"), b"edited")
    assert not store.verify(store.join(root, "c", "y.bin"), digest)
    assert store.verify(src, digest)  # a rewrite of the linked copy does not touch the original
    assert not store.verify(store.join(root, "c", "missing.bin"), digest)
    store.delete_prefix(store.join(root, "c"))
    assert store.list_uris(store.join(root, "c")) == []


def test_s3_writes_carry_a_sha256_checksum_that_s3_keeps(s3_bucket, tmp_path):
    uri = store.join(s3_bucket, "x.json")
    digest = store.write_bytes(uri, b"{}")
    checksum = store.s3_checksum(uri)
    assert checksum and store._hex_of_full_checksum(checksum) == digest
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 1024 * 1024))  # above boto3's multipart threshold
    file_uri = store.join(s3_bucket, "big.bin")
    file_digest = store.upload_file(big, file_uri)
    assert store.s3_checksum(file_uri)  # composite for a multipart upload on real S3; moto gives one value
    assert store.sha256(file_uri) == file_digest
    assert store.verify(file_uri, file_digest, store.s3_checksum(file_uri))


# ---------------------------------------------------------------------------------------------------------------
# leases


def test_a_lease_has_one_holder_until_released_or_expired(root, monkeypatch):
    import time

    from shared.contract.lease import Lease

    uri = store.join(root, "stage.lease.json")
    first, second = Lease(uri, what="first", ttl_s=60), Lease(uri, what="second", ttl_s=60)
    assert first.try_acquire() and not second.try_acquire()
    assert first.holder()["owner"] == first.owner
    first.release()
    assert second.try_acquire()
    second._stop.set()  # its holder hangs: no more renewals
    record = second.holder()
    store.write_json(uri, {**record, "host": "another-host", "expires_at": time.time() - 1})
    third = Lease(uri, what="third", ttl_s=60)
    assert third.try_acquire()  # expired: taken over
    with pytest.raises(Exception, match="taken"):
        second.renew()
    third.release()


def test_a_held_lease_is_renewed_by_its_holder(root):
    import time

    from shared.contract.lease import Lease

    lease = Lease(store.join(root, "renewed.lease.json"), ttl_s=0.8)
    assert lease.try_acquire()
    first = lease.holder()["expires_at"]
    time.sleep(0.6)
    assert lease.holder()["expires_at"] > first
    assert not Lease(lease.uri, ttl_s=0.8).try_acquire()
    lease.release()
    assert lease.holder() is None


# ---------------------------------------------------------------------------------------------------------------
# the judge cache in the store


@pytest.mark.parametrize("garbage", [b"\x00\xff not json", b"[1, 2]", b'{"key": "other", "score": 5}',
                                     b'{"key": "KEY", "score": "high"}'])
def test_a_corrupt_judge_cache_entry_is_a_miss_with_one_warning(root, garbage, capsys):
    from shared.judge.cache import JudgeCache

    cache = JudgeCache(store.join(root, "cache", "judge"), "tiny:qwen2")
    key = "ab" * 32
    cache.put(key, {"score": 71.5, "label": None})
    assert cache.get(key)["score"] == 71.5
    store.write_bytes(cache.uri_for(key), garbage.replace(b"KEY", key.encode()))
    assert cache.get_many([key]) == {}
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and cache.uri_for(key) in warnings[0]
    cache.put(key, {"score": 12.0, "label": None})  # judged again: the entry is rewritten
    assert cache.get(key)["score"] == 12.0


def test_a_store_that_ignores_conditional_writes_is_refused_and_one_that_honours_them_is_not(tmp_path, monkeypatch):
    root = store.from_path(tmp_path / "ok")
    store.check_writable(root)  # a real conditional create: refused for the existing probe, so the store is fine

    def ignores_the_condition(uri, data):  # what an S3-compatible server that drops If-None-Match does
        return store.write_bytes(uri, data)

    monkeypatch.setattr(store, "put_if_absent", ignores_the_condition)
    with pytest.raises(store.StoreError, match="ignores conditional writes") as err:
        store.check_writable(root)
    assert "\n" not in str(err.value)
    assert store.list_uris(root) == []  # the probe is gone either way


def test_a_store_uri_with_a_fragment_or_query_is_refused():
    for root in ("file:///tmp/x#frag", "s3://bucket/prefix?versionId=1"):
        with pytest.raises(store.StoreError, match="has a '#' or '?'"):
            store.normalize_root(root)
    assert store.normalize_root("/tmp/a#b").endswith("/tmp/a%23b")  # a plain path may hold one: it is quoted
