"""Read back what an offline W&B run wrote, without syncing it anywhere.

An offline run folder (``<WANDB_DIR>/wandb/offline-run-<time>-<id>/``) holds ``run-<id>.wandb``, the run's
transaction log, and ``files/`` (media, saved files). The log is the LevelDB log format (google/leveldb
``doc/log_format.md``: 32 KiB blocks of chunks, each a little-endian CRC-32, length and type FULL/FIRST/MIDDLE/LAST)
behind a 7-byte W&B header (``:W&B``, magic 0xBEE1, version), and every record is a ``wandb_internal_pb2.Record``,
the SDK's own protobuf. This is what ``wandb sync`` replays; here it is replayed into plain Python values.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    """The payloads of a ``.wandb`` file, each CRC-checked."""
    data = Path(path).read_bytes()
    ident, magic, _version = FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log")
    out, pending, pos = [], b"", FILE_HEADER.size
    while pos + CHUNK_HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0:  # zero-filled rest of a block
            pos += left
            continue
        body = data[pos + CHUNK_HEADER.size : pos + CHUNK_HEADER.size + length]
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += CHUNK_HEADER.size + length
        if kind == FULL:
            out.append(body)
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            out.append(pending + body)
            pending = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    folder: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    project: str = ""
    notes: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None

    def curve(self, key: str) -> list[tuple[int, Any]]:
        """``(step, value)`` of every history row that has ``key``."""
        return [(row["_step"], row[key]) for row in self.history if key in row]

    def media(self) -> list[Path]:
        return sorted(p for p in (self.folder / "files" / "media").rglob("*") if p.is_file())


def read_run(folder: Path, wait_s: float = 30.0) -> OfflineRun:
    """The run in ``folder``. The SDK's service process may still be writing the log when ``finish`` returns, so
    this waits (up to ``wait_s``) for the run's exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        run = _replay(Path(folder))
        if run.exit_code is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _replay(folder: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = folder.glob("run-*.wandb")
    run = OfflineRun(folder)
    for raw in records(log):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.name, run.group, run.job_type = r.run_id, r.display_name, r.run_group, r.job_type
            run.project, run.notes, run.tags = r.project, r.notes, list(r.tags)
            run.config |= {i.key: json.loads(i.value_json) for i in r.config.update}
        elif kind == "config":
            run.config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary |= {_key(i): json.loads(i.value_json) for i in record.summary.update}
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline run under ``wandb_dir`` (the ``WANDB_DIR`` the runs were started with)."""
    return [read_run(f) for f in sorted(Path(wandb_dir).glob("wandb/offline-run-*")) if f.is_dir()]
