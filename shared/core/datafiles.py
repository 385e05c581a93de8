"""Files a workflow reads at plan time: shipped package data (``package:<path>``) or the user's own files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from shared.core.config import ConfigError

PACKAGE_PREFIX = "package:"


def read_text(ref: str, what: str) -> str:
    if ref.startswith(PACKAGE_PREFIX):
        item = resources.files("shared.data").joinpath(ref[len(PACKAGE_PREFIX):])
        if not item.is_file():
            raise ConfigError(f"{what}: no shipped data file {ref!r}")
        return item.read_text()
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what}: file {ref!r} not found")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {ref} is not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"{what}: {ref} cannot be read ({err.strerror or err})") from None


def read_records(ref: str, what: str) -> list:
    """A JSON list, a JSON object with one list field, or JSONL."""
    text = read_text(ref, what).strip()
    if not text:
        raise ConfigError(f"{what}: {ref} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ConfigError(f"{what}: {ref} is neither JSON nor JSONL ({err.msg} at line {err.lineno})") from None
    if isinstance(data, dict):
        lists = [v for k, v in data.items() if isinstance(v, list) and not k.startswith("_")]
        if len(lists) != 1:
            raise ConfigError(f"{what}: {ref} must hold one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise ConfigError(f"{what}: {ref} must hold a list of records")
    if not data:
        raise ConfigError(f"{what}: {ref} holds no records")
    return data


def read_questions(ref: str, what: str = "question panel") -> list[dict]:
    """Questions as ``{"id", "text"}``; plain strings get ids ``q00``, ``q01``..."""
    out = []
    for i, record in enumerate(read_records(ref, what)):
        if isinstance(record, str):
            record = {"id": f"q{i:02d}", "text": record}
        if not isinstance(record, dict) or "text" not in record:
            raise ConfigError(f"{what}: record {i} of {ref} has no 'text'")
        out.append({"id": str(record.get("id", f"q{i:02d}")), "text": record["text"]})
    ids = [q["id"] for q in out]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{what}: duplicate question ids in {ref}")
    if not out:
        raise ConfigError(f"{what}: {ref} holds no questions")
    return out
