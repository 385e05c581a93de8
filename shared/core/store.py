"""Artifact store: one interface over ``file://`` and ``s3://`` URIs.

Every stage reads its inputs and writes its outputs through these functions, so the same code runs against a local
folder on one machine and against S3 (or MinIO, via ``AWS_ENDPOINT_URL`` / ``S3_ENDPOINT_URL``) on a cluster.
Local writes are atomic (temp file + rename) so a killed process never leaves a half-written artifact behind.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse


class StoreError(RuntimeError):
    """A store operation failed; the message is one readable line."""


class ArtifactNotFound(StoreError):
    """The URI names nothing in the store."""


def _scheme(uri: str) -> str:
    scheme = urlparse(uri).scheme
    if scheme not in ("file", "s3"):
        raise StoreError(f"unsupported store URI {uri!r}: expected file://... or s3://bucket/prefix")
    return scheme


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def from_path(path: str | Path) -> str:
    """A ``file://`` URI for a local path (made absolute)."""
    return Path(path).resolve().as_uri()


def normalize_root(root: str) -> str:
    """Accept a plain local path as well as a URI; an S3 root must name a bucket."""
    root = str(root).strip()
    if not root:
        raise StoreError("empty store root: give a path, file://... or s3://bucket/prefix")
    if "://" in root and ("#" in root or "?" in root):
        # a URI's fragment or query is not part of its path: every artifact would map to one folder
        raise StoreError(f"store root {root!r} has a '#' or '?': a store URI is a path (file:///...) or s3://bucket/prefix")
    if "://" not in root:
        if root.lower().startswith(("s3:", "file:")):
            raise StoreError(f"store root {root!r} is malformed: expected file:///path or s3://bucket/prefix")
        return from_path(root)
    if _scheme(root) == "s3":
        _bucket_key(root)
    elif not _local(root).is_absolute():
        raise StoreError(f"file store root {root!r} must be an absolute path (file:///...)")
    return root.rstrip("/")


def _local(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def _bucket_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StoreError(f"S3 URI {uri!r} names no bucket: expected s3://bucket/prefix")
    return parsed.netloc, parsed.path.lstrip("/")


@lru_cache(maxsize=8)
def _s3_client(endpoint_url: str | None):
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def s3_client():
    # boto3 itself honours AWS_ENDPOINT_URL; S3_ENDPOINT_URL is accepted too because MinIO docs use it.
    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
    return _s3_client(endpoint)


def _s3_call(uri: str, fn, *args, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "error")
        error = ArtifactNotFound if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket") else StoreError
        raise error(f"S3 {code} for {uri}: {err.response.get('Error', {}).get('Message', '')}".rstrip(": ")) from None
    except BotoCoreError as err:
        raise StoreError(f"S3 unreachable for {uri}: {err}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _b64_checksum(hex_digest: str) -> str:
    """S3's form of a SHA-256 checksum (base64 of the raw digest)."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _multipart(head: dict) -> bool:
    # a multipart object's ETag ends in -<parts>; its checksum is then over the parts, whatever its form says
    return head.get("ChecksumType") == "COMPOSITE" or bool(re.search(r"-\d+\"?$", head.get("ETag", "")))


def _hex_of_full_checksum(value: str | None, head: dict | None = None) -> str | None:
    """The hex sha256 an S3 ``ChecksumSHA256`` stands for, or None for a composite (multipart) checksum."""
    if not value or "-" in value or (head is not None and _multipart(head)):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return raw.hex() if len(raw) == 32 else None


# ---------------------------------------------------------------------------------------------------------------
# bytes


def write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` at ``uri`` and return its sha256."""
    digest = sha256_bytes(data)
    if _scheme(uri) == "file":
        path = _local(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        bucket, key = _bucket_key(uri)
        # S3 checks the body against this checksum on upload and keeps it, so a later check needs no download
        _s3_call(uri, s3_client().put_object, Bucket=bucket, Key=key, Body=data, Metadata={"sha256": digest},
                 ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64_checksum(digest))
    return digest


def _head(uri: str) -> dict:
    bucket, key = _bucket_key(uri)
    return _s3_call(uri, s3_client().head_object, Bucket=bucket, Key=key, ChecksumMode="ENABLED")


def s3_checksum(uri: str) -> str | None:
    """The SHA-256 checksum S3 stored for an object at upload (``base64`` or ``base64-N`` for multipart)."""
    return _head(uri).get("ChecksumSHA256")


def read_bytes(uri: str) -> bytes:
    if _scheme(uri) == "file":
        path = _local(uri)
        if not path.is_file():
            raise ArtifactNotFound(f"artifact not found: {uri}")
        return path.read_bytes()
    bucket, key = _bucket_key(uri)
    body = _s3_call(uri, s3_client().get_object, Bucket=bucket, Key=key)["Body"]
    return body.read()


def exists(uri: str) -> bool:
    if _scheme(uri) == "file":
        return _local(uri).exists()
    bucket, key = _bucket_key(uri)
    try:
        _s3_call(uri, s3_client().head_object, Bucket=bucket, Key=key)
        return True
    except ArtifactNotFound:
        return False


def delete(uri: str) -> None:
    if _scheme(uri) == "file":
        path = _local(uri)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    bucket, key = _bucket_key(uri)
    _s3_call(uri, s3_client().delete_object, Bucket=bucket, Key=key)


def delete_prefix(uri: str) -> None:
    """Delete everything at or below ``uri`` (a file or a folder)."""
    if _scheme(uri) == "file":
        delete(uri)
        return
    members = list_uris(uri)
    bucket, key = _bucket_key(uri)
    if exists(uri):
        members.append(uri)
    for start in range(0, len(members), 1000):
        batch = [{"Key": _bucket_key(m)[1]} for m in members[start:start + 1000]]
        _s3_call(uri, s3_client().delete_objects, Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def list_uris(prefix_uri: str) -> list[str]:
    """Every object (file) below ``prefix_uri``, sorted, as full URIs."""
    prefix_uri = prefix_uri.rstrip("/")
    if _scheme(prefix_uri) == "file":
        root = _local(prefix_uri)
        if not root.exists():
            return []
        if root.is_file():
            return [prefix_uri]
        return sorted(
            join(prefix_uri, p.relative_to(root).as_posix())
            for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(".tmp")
        )
    bucket, key = _bucket_key(prefix_uri)
    paginator = s3_client().get_paginator("list_objects_v2")
    out = []
    for page in _s3_call(prefix_uri, lambda: list(paginator.paginate(Bucket=bucket, Prefix=f"{key}/" if key else ""))):
        for obj in page.get("Contents", []):
            out.append(f"s3://{bucket}/{obj['Key']}")
    return sorted(out)


def sha256(uri: str) -> str:
    """sha256 of a file artifact, or of a folder (over its sorted relative names and file hashes)."""
    if _scheme(uri) == "file":
        path = _local(uri)
        if path.is_file():
            return sha256_file(path)
    elif exists(uri):
        head = _head(uri)
        # a full-object checksum S3 verified at upload beats our own metadata, which any client may set
        stored = _hex_of_full_checksum(head.get("ChecksumSHA256"), head) or head.get("Metadata", {}).get("sha256")
        return stored or sha256_bytes(read_bytes(uri))
    members = list_uris(uri)
    if not members:
        raise ArtifactNotFound(f"artifact not found: {uri}")
    digest = hashlib.sha256()
    for member in members:
        digest.update(member[len(uri.rstrip("/")) + 1 :].encode())
        digest.update(sha256(member).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# typed helpers


def strict_json_value(obj: Any) -> Any:
    """``obj`` with every NaN or infinity made ``null``: JSON has no such numbers (``NaN`` is not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_value(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON text of ``obj`` (no bare NaN or Infinity); what every JSON the project writes goes through."""
    return json.dumps(strict_json_value(obj), allow_nan=False, default=str, **kwargs)


def write_json(uri: str, obj: Any) -> str:
    return write_bytes(uri, (dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as err:
        raise StoreError(f"not valid JSON: {uri} ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise StoreError(f"not valid JSON: {uri} (not UTF-8 text)") from None


def write_jsonl(uri: str, rows: list[dict]) -> str:
    return write_bytes(uri, "".join(dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def read_jsonl(uri: str) -> list[dict]:
    text = read_bytes(uri).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_text(uri: str, text: str) -> str:
    return write_bytes(uri, text.encode())


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_tensors(uri: str, tensors: dict) -> str:
    """Save a dict of torch tensors (safetensors format, no pickle)."""
    from safetensors.torch import save

    return write_bytes(uri, save({k: v.contiguous().cpu() for k, v in tensors.items()}))


def read_tensors(uri: str) -> dict:
    from safetensors.torch import load

    return load(read_bytes(uri))


def write_npz(uri: str, **arrays) -> str:
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes(uri, buf.getvalue())


def read_npz(uri: str) -> dict:
    import numpy as np

    with np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# ---------------------------------------------------------------------------------------------------------------
# files and folders


def upload_file(local_path: str | Path, uri: str) -> str:
    if _scheme(uri) == "file":
        return write_bytes(uri, Path(local_path).read_bytes())
    digest = sha256_file(local_path)
    bucket, key = _bucket_key(uri)
    _s3_call(
        uri, s3_client().upload_file, str(local_path), bucket, key,
        ExtraArgs={"Metadata": {"sha256": digest}, "ChecksumAlgorithm": "SHA256"},
    )
    return digest


def download_file(uri: str, local_path: str | Path) -> Path:
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if _scheme(uri) == "file":
        src = _local(uri)
        if not src.is_file():
            raise ArtifactNotFound(f"artifact not found: {uri}")
        shutil.copyfile(src, local_path)
    else:
        bucket, key = _bucket_key(uri)
        _s3_call(uri, s3_client().download_file, bucket, key, str(local_path))
    return local_path


def upload_dir(local_dir: str | Path, uri: str) -> dict[str, str]:
    """Upload every file below ``local_dir``; returns {uri: sha256}."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StoreError(f"not a folder: {local_dir}")
    return {
        join(uri, p.relative_to(local_dir).as_posix()): upload_file(p, join(uri, p.relative_to(local_dir).as_posix()))
        for p in sorted(local_dir.rglob("*"))
        if p.is_file()
    }


def download_dir(uri: str, local_dir: str | Path) -> Path:
    local_dir = Path(local_dir)
    members = list_uris(uri)
    if not members:
        raise ArtifactNotFound(f"artifact folder not found or empty: {uri}")
    base = uri.rstrip("/")
    for member in members:
        download_file(member, local_dir / member[len(base) + 1 :])
    return local_dir


def cache_root() -> Path:
    return Path(os.environ.get("EPS_CACHE", Path.home() / ".cache" / "explore-persona-space"))


def local_cache_dir(uri: str) -> Path:
    """A stable local folder for a URI (content-addressed by the URI text)."""
    return cache_root() / "artifacts" / sha256_bytes(uri.encode())[:24]


def fetch_dir(uri: str) -> Path:
    """Local copy of a stored folder; ``file://`` folders are used in place."""
    if _scheme(uri) == "file" and _local(uri).is_dir():
        return _local(uri)
    target = local_cache_dir(uri)
    done = target / ".complete"
    if not done.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        download_dir(uri, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        done.touch()
    return target


def fetch_file(uri: str) -> Path:
    """Local path of a stored file; ``file://`` files are used in place."""
    if _scheme(uri) == "file":
        path = _local(uri)
        if not path.is_file():
            raise ArtifactNotFound(f"artifact not found: {uri}")
        return path
    target = local_cache_dir(uri) / Path(urlparse(uri).path).name
    if not target.exists():
        download_file(uri, target)
    return target


# ---------------------------------------------------------------------------------------------------------------
# verified copies, moves and conditional writes (the stage contract's cache, staging and leases use these)


def verify(uri: str, expected_sha256: str, s3_checksum_recorded: str | None = None) -> bool:
    """Does the artifact at ``uri`` still hold the content whose sha256 a manifest recorded?

    A local file is hashed. On S3 the checksum S3 computed at upload answers without a download: it is compared
    with the one the manifest recorded (multipart uploads have a composite checksum) or with the sha256 itself;
    only an object without a usable checksum is downloaded and hashed.
    """
    if _scheme(uri) == "file":
        path = _local(uri)
        return path.is_file() and sha256_file(path) == expected_sha256
    try:
        head = _head(uri)
    except ArtifactNotFound:
        return False
    stored = head.get("ChecksumSHA256")
    if stored and (stored == s3_checksum_recorded or stored == _b64_checksum(expected_sha256)):
        return True
    if _hex_of_full_checksum(stored, head):
        return False  # a full-object checksum that differs: the content differs
    return sha256_bytes(read_bytes(uri)) == expected_sha256


def copy(src: str, dst: str, *, link: bool = True) -> str:
    """Copy one artifact within a store; returns how: ``link`` (a hard link, no bytes copied) or ``copy``.

    Local files are hard-linked when ``link`` and the file system allows it (a later in-place rewrite of either
    path by the store replaces that path's inode, so the other keeps its content); S3 copies server-side and
    has S3 compute the copy's SHA-256 checksum.
    """
    if _scheme(src) != _scheme(dst):
        raise StoreError(f"cannot copy between stores: {src} -> {dst}")
    if _scheme(src) == "file":
        source, target = _local(src), _local(dst)
        if not source.is_file():
            raise ArtifactNotFound(f"artifact not found: {src}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        how = "copy"
        if link:
            try:
                os.link(source, tmp)
                how = "link"
            except OSError:
                pass
        if how == "copy":
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return how
    (src_bucket, src_key), (bucket, key) = _bucket_key(src), _bucket_key(dst)
    source = {"Bucket": src_bucket, "Key": src_key}
    size = _s3_call(src, s3_client().head_object, Bucket=src_bucket, Key=src_key)["ContentLength"]
    if size < 5 * 1024**3:  # one CopyObject call up to 5 GB; S3 computes a full-object checksum of the copy
        _s3_call(dst, s3_client().copy_object, Bucket=bucket, Key=key, CopySource=source,
                 ChecksumAlgorithm="SHA256", MetadataDirective="COPY")
    else:
        _s3_call(dst, s3_client().copy, source, bucket, key, ExtraArgs={"ChecksumAlgorithm": "SHA256"})
    return "copy"


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(second))


def replace_folder(new: str, target: str) -> None:
    """Make the local folder ``new`` the folder ``target`` at once: whoever looks sees the old folder whole or the new
    one whole, never a mix; the old one is deleted after. (A kill mid-way leaves one of the two, each complete.)"""
    source, dest = _local(new), _local(target)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, dest)
        return
    if _exchange(source, dest):
        shutil.rmtree(source)
        return
    aside = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dest, aside)  # without an atomic exchange: a moment with no folder here, never a mixed one
    os.rename(source, dest)
    shutil.rmtree(aside)


def move(src: str, dst: str) -> None:
    """Move one artifact within a store: an atomic rename locally, copy then delete on S3."""
    if _scheme(src) == "file":
        source, target = _local(src), _local(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact not found: {src}") from None
        return
    copy(src, dst, link=False)
    delete(src)


def check_writable(root: str) -> None:
    """Fail with one line now, not halfway through a run, when the store root cannot be written."""
    root = normalize_root(root)
    probe = join(root, f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"probe")
        try:
            # the one-writer lease rests on conditional writes: a store that ignores them must not be used
            overwrote = put_if_absent(probe, b"second writer")
        finally:
            delete(probe)
    except OSError as err:
        raise StoreError(f"store {root} is not writable: {err.strerror or err}") from None
    if overwrote is not None:
        raise StoreError(f"store {root} ignores conditional writes (a create-if-absent of an existing object "
                         "succeeded): the one-writer lease cannot work there; use S3 or a server that honours If-None-Match")


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """(content, version tag) of an object, or None when absent; the tag is what ``put_if_match`` compares."""
    if _scheme(uri) == "file":
        try:
            data = _local(uri).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        return data, sha256_bytes(data)
    bucket, key = _bucket_key(uri)
    try:
        obj = _s3_call(uri, s3_client().get_object, Bucket=bucket, Key=key)
    except ArtifactNotFound:
        return None
    return obj["Body"].read(), obj["ETag"]


def _is_precondition_failure(err: StoreError) -> bool:
    text = str(err)
    return "PreconditionFailed" in text or "ConditionalRequestConflict" in text or " 412 " in f" {text} "


class _FolderGuard:
    """An exclusive flock on a local folder: makes read-compare-write on one of its files atomic."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self):
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.folder, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def put_if_absent(uri: str, data: bytes) -> str | None:
    """Create ``uri`` only if nothing is there; the new version tag, or None when something already was."""
    if _scheme(uri) == "file":
        path = _local(uri)
        with _FolderGuard(path.parent):
            if path.exists():
                return None
            write_bytes(uri, data)
        return sha256_bytes(data)
    bucket, key = _bucket_key(uri)
    try:
        return _s3_call(uri, s3_client().put_object, Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
    except StoreError as err:
        if _is_precondition_failure(err):
            return None
        raise


def put_if_match(uri: str, data: bytes, version: str) -> str | None:
    """Replace ``uri`` only if it still is at ``version``; the new version tag, or None when it changed."""
    if _scheme(uri) == "file":
        path = _local(uri)
        with _FolderGuard(path.parent):
            current = read_versioned(uri)
            if current is None or current[1] != version:
                return None
            write_bytes(uri, data)
        return sha256_bytes(data)
    bucket, key = _bucket_key(uri)
    try:
        return _s3_call(uri, s3_client().put_object, Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"]
    except StoreError as err:
        if _is_precondition_failure(err) or isinstance(err, ArtifactNotFound):
            return None
        raise


def delete_if_match(uri: str, version: str) -> bool:
    """Delete ``uri`` only if it still is at ``version`` (a lease is released only by its holder)."""
    if _scheme(uri) == "file":
        path = _local(uri)
        with _FolderGuard(path.parent):
            current = read_versioned(uri)
            if current is None or current[1] != version:
                return False
            path.unlink()
        return True
    current = read_versioned(uri)
    if current is None or current[1] != version:
        return False
    delete(uri)
    return True
