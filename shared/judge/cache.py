"""Judgements cached in the artifact store by content hash, so a re-run re-judges nothing it already has.

Layout: ``<cache_uri>/<model>/<key[:2]>/<key>.json``, one small JSON file per judgement (atomic per file, safe
for concurrent writers, works the same on file:// and s3://). Only judgements the same request would give again
are written (a score, a sentinel label, or a local judge's abstention); other errors are left out so the next run
retries them. An entry that cannot be read (cut short,
edited, not JSON) is a miss with one warning line: the item is judged again and the entry rewritten.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from shared.core import store

if TYPE_CHECKING:
    from shared.judge.templates import JudgeTemplate

_LOOKUP_THREADS = 16
ABSTAINED = "abstained"  # shared.judge.base.ABSTAINED (not imported: base imports this module)  # store lookups are latency-bound on S3


def content_hash(*, kind: str, model: str, template: JudgeTemplate, question: str, answer: str,
                 settings: dict | None = None) -> str:
    """sha256 over everything that decides a judgement; 64 hex chars, also valid as a batch custom_id.

    ``settings`` are the request options that change what the judge says (e.g. thinking, effort); options
    that do not (max_tokens, timeouts, retries) stay out so that changing them keeps the cache.
    """
    payload = [kind, model, template.name, template.sha256, question, answer, settings or {}]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_store_cache_uri(store_root: str) -> str:
    """Where judge stages keep their cache by default: ``<store root>/cache/judge``, shared by every run."""
    return store.join(store.normalize_root(store_root), "cache", "judge")


def _safe_segment(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


class JudgeCache:
    def __init__(self, cache_uri: str, model: str):
        self.root = store.join(cache_uri, _safe_segment(model))

    def uri_for(self, key: str) -> str:
        return store.join(self.root, key[:2], f"{key}.json")

    def get(self, key: str) -> dict | None:
        uri = self.uri_for(key)
        found = store.read_versioned(uri)
        if found is None:
            return None
        try:
            record = json.loads(found[0])
        except ValueError:
            record = None
        usable = isinstance(record, dict) and record.get("key") == key and (
            _is_number(record.get("score")) or isinstance(record.get("label"), str)
            or record.get("error") == ABSTAINED
        ) and (record.get("score") is None or _is_number(record.get("score")))
        if not usable:
            print(f"warning: judge cache entry {uri} is unreadable or not this item's: judging it again",
                  file=sys.stderr, flush=True)
            return None
        return record

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        if not keys:
            return {}
        with ThreadPoolExecutor(min(_LOOKUP_THREADS, len(keys))) as pool:
            found = pool.map(self.get, keys)
        return {key: record for key, record in zip(keys, found, strict=True) if record is not None}

    def put(self, key: str, record: dict) -> None:
        store.write_json(self.uri_for(key), {**record, "key": key})

    # Message Batches in flight, so a killed run resumes polling its batch instead of paying for a new one.
    def batch_record_uri(self, batch_key: str) -> str:
        return store.join(self.root, "batches", f"{batch_key}.json")

    def get_batch_record(self, batch_key: str) -> dict | None:
        uri = self.batch_record_uri(batch_key)
        found = store.read_versioned(uri)
        if found is None:
            return None
        try:
            record = json.loads(found[0])
        except ValueError:
            record = None
        if not isinstance(record, dict):
            print(f"warning: batch record {uri} is unreadable: ignored", file=sys.stderr, flush=True)
            return None
        return record

    def put_batch_record(self, batch_key: str, record: dict) -> None:
        store.write_json(self.batch_record_uri(batch_key), record)
