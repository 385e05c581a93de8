"""Claude as judge, through the official ``anthropic`` SDK.

Small jobs use the Messages API on a thread pool; bulk jobs (at least ``spec.batch_threshold`` uncached items) use
Message Batches with ``custom_id`` = the item's content hash. Every call is retried per ``spec.retry``.

Per item, a failed request, an unparseable reply, or an errored/expired/canceled batch entry is a counted error.
What stops the run instead (JudgeError, one readable line): a missing API key, rejected credentials, an unknown
model, or a batch that cannot be created, polled or read after all retries; a re-run then resumes the batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TypeVar

import anthropic

from shared.judge.base import (
    BATCH_CANCELED,
    BATCH_ERRORED,
    BATCH_EXPIRED,
    BATCH_MISSING,
    JUDGE_REFUSED,
    REQUEST_FAILED,
    TRUNCATED,
    Judge,
    JudgeItem,
    Record,
    Verdict,
)
from shared.judge.cache import JudgeCache
from shared.judge.errors import JudgeAuthError, JudgeConfigError, JudgeError
from shared.judge.parsing import parse_reply
from shared.judge.retry import call_with_retries
from shared.judge.spec import JudgeSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

API_KEY_ENV = "ANTHROPIC_API_KEY"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"


class AnthropicJudge(Judge):
    def __init__(self, spec: JudgeSpec, cache: JudgeCache | None = None, *,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(spec, cache)
        self._sleep = sleep
        self._api_key: str | None = None
        self._client: anthropic.Anthropic | None = None

    # -- client ---------------------------------------------------------------------------------------------

    def _client_or_raise(self) -> anthropic.Anthropic:
        # Created on first use, so a fully cached re-run needs no key.
        if self._client is None:
            key = os.environ.get(API_KEY_ENV, "").strip()
            if not key:
                raise JudgeConfigError(
                    f"{API_KEY_ENV} is not set: the anthropic judge reads its API key from the environment "
                    "(use a judge of kind 'local' for offline runs)"
                )
            self._api_key = key
            self._client = anthropic.Anthropic(
                api_key=key,
                base_url=os.environ.get(BASE_URL_ENV) or None,
                max_retries=0,  # retries are ours: shared.judge.retry, configured by spec.retry
                timeout=self.spec.request_timeout_s,
            )
        return self._client

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[redacted]") if self._api_key else text

    def _describe(self, err: anthropic.APIError) -> str:
        if isinstance(err, anthropic.APIStatusError):
            body = err.body if isinstance(err.body, dict) else {}
            detail = body.get("error") if isinstance(body.get("error"), dict) else {}
            text = f"HTTP {err.status_code} {detail.get('type', '')}: {detail.get('message', '')}".strip(" :")
        else:
            text = type(err).__name__
        return self._redact(text)[:300]

    def _fatal_error(self, err: anthropic.APIStatusError, what: str) -> JudgeError | None:
        """Failures that would hit every item alike stop the run instead of being counted per item."""
        if err.status_code in (401, 403):
            return JudgeAuthError(f"{what}: Anthropic rejected the credentials ({self._describe(err)}); check {API_KEY_ENV}")
        if err.status_code == 404:
            return JudgeConfigError(f"{what}: not found ({self._describe(err)}); check the judge model {self.spec.model!r}")
        return None

    def _call(self, call: Callable[[], T], what: str) -> T:
        return call_with_retries(call, self.spec.retry, what=what, sleep=self._sleep)

    def _call_or_stop(self, call: Callable[[], T], what: str) -> T:
        """For batch-level calls: any failure that survives the retries stops the run."""
        try:
            return self._call(call, what)
        except anthropic.APIStatusError as err:
            raise (self._fatal_error(err, what) or JudgeError(f"{what} failed: {self._describe(err)}")) from None
        except anthropic.APIConnectionError as err:
            raise JudgeError(f"{what} failed: cannot reach the Anthropic API ({type(err).__name__})") from None

    # -- requests and replies -------------------------------------------------------------------------------

    def judgement_settings(self) -> dict:
        return {"thinking": self.spec.thinking, "effort": self.spec.effort}

    def _request_params(self, item: JudgeItem) -> dict:
        params = {
            "model": self.spec.model,
            "max_tokens": self.spec.max_tokens,
            "system": self.template.system,
            "messages": [{"role": "user", "content": self.template.render_user(item.question, item.answer)}],
        }
        if self.spec.thinking != "default":
            params["thinking"] = {"type": self.spec.thinking}
        if self.spec.effort is not None:
            params["output_config"] = {"effort": self.spec.effort}
        return params

    def verdict_from_cache(self, record: dict) -> Verdict:
        """The cached reply parsed again by today's parse rule: the cache keeps what Claude said (paid for), and a
        change to the parsing code changes the score without asking again."""
        raw = record.get("raw")
        if not isinstance(raw, str):
            return super().verdict_from_cache(record)
        parsed = parse_reply(raw, self.template.parse_rule)
        return Verdict(score=None if parsed.score is None else float(parsed.score), label=parsed.label,
                       error=parsed.error, raw=raw)

    def _verdict_from_message(self, message) -> Verdict:
        # thinking blocks, if any, are not the reply: only text blocks are parsed
        text = "".join(block.text for block in message.content if getattr(block, "type", None) == "text")
        parsed = parse_reply(text, self.template.parse_rule)
        score = None if parsed.score is None else float(parsed.score)
        error = parsed.error
        if error and message.stop_reason == "max_tokens":
            error = TRUNCATED
        elif error and message.stop_reason == "refusal":
            error = JUDGE_REFUSED
        return Verdict(score=score, label=parsed.label, error=error, raw=text)

    def _verdict_from_batch_result(self, result) -> Verdict:
        if result.type == "succeeded":
            return self._verdict_from_message(result.message)
        if result.type == "errored":
            error = getattr(result.error, "error", None)
            return Verdict(error=BATCH_ERRORED, raw=f"{getattr(error, 'type', 'error')}: {getattr(error, 'message', '')}")
        if result.type == "expired":
            return Verdict(error=BATCH_EXPIRED, raw="the batch expired before this request was processed")
        return Verdict(error=BATCH_CANCELED, raw=f"batch result type {result.type!r}")

    # -- dispatch ---------------------------------------------------------------------------------------------

    def _judge_uncached(self, todo: list[tuple[str, JudgeItem]], record: Record) -> None:
        if len(todo) >= self.spec.batch_threshold:
            self._judge_in_batches(todo, record)
        else:
            self._judge_one_by_one(todo, record)

    # -- Messages API -----------------------------------------------------------------------------------------

    def _judge_one_by_one(self, todo: list[tuple[str, JudgeItem]], record: Record) -> None:
        client = self._client_or_raise()
        with ThreadPoolExecutor(min(self.spec.max_concurrency, len(todo))) as pool:
            futures = {pool.submit(self._judge_one, client, item): key for key, item in todo}
            try:
                for future in as_completed(futures):
                    record(futures[future], future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _judge_one(self, client: anthropic.Anthropic, item: JudgeItem) -> Verdict:
        what = "messages.create"
        try:
            message = self._call(lambda: client.messages.create(**self._request_params(item)), what)
        except anthropic.APIStatusError as err:
            fatal = self._fatal_error(err, what)
            if fatal:
                raise fatal from None
            return Verdict(error=REQUEST_FAILED, raw=self._describe(err))
        except anthropic.APIConnectionError as err:
            return Verdict(error=REQUEST_FAILED, raw=self._describe(err))
        return self._verdict_from_message(message)

    # -- Message Batches --------------------------------------------------------------------------------------

    def _judge_in_batches(self, todo: list[tuple[str, JudgeItem]], record: Record) -> None:
        client = self._client_or_raise()
        size = self.spec.max_batch_requests
        in_flight: dict[str, tuple[str, list[tuple[str, JudgeItem]]]] = {}
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            batch_key = hashlib.sha256("\n".join(sorted(key for key, _ in chunk)).encode()).hexdigest()
            in_flight[self._resume_or_create_batch(client, batch_key, chunk)] = (batch_key, chunk)

        started = time.monotonic()
        deadline = started + self.spec.batch_timeout_s
        polls = 0
        while in_flight:
            polls += 1
            for batch_id in list(in_flight):
                batch = self._call_or_stop(lambda bid=batch_id: client.messages.batches.retrieve(bid),
                                           "messages.batches.retrieve")
                if batch.processing_status != "ended":
                    log.debug("batch %s: %s %s", batch_id, batch.processing_status, batch.request_counts)
                    continue
                batch_key, chunk = in_flight.pop(batch_id)
                self._collect_batch(client, batch, chunk, record)
                if self.cache:
                    self.cache.put_batch_record(batch_key, {"batch_id": batch_id, "state": "collected"})
            if in_flight:
                if polls % 20 == 0:  # a sign of life on long waits, without a line per poll
                    log.info("waiting for %d batch(es) after %.0fs", len(in_flight), time.monotonic() - started)
                if time.monotonic() > deadline:
                    raise JudgeError(
                        f"batches {sorted(in_flight)} still running after {self.spec.batch_timeout_s:.0f}s; "
                        "re-run to resume polling them"
                    )
                self._sleep(self.spec.poll_interval_s)

    def _resume_or_create_batch(self, client: anthropic.Anthropic, batch_key: str,
                                chunk: list[tuple[str, JudgeItem]]) -> str:
        previous = self.cache.get_batch_record(batch_key) if self.cache else None
        if previous and previous.get("state") == "submitted":
            try:
                batch = self._call_or_stop(lambda: client.messages.batches.retrieve(previous["batch_id"]),
                                           "messages.batches.retrieve")
                log.info("resuming batch %s (%d requests, %s)", batch.id, len(chunk), batch.processing_status)
                return batch.id
            except JudgeConfigError:
                log.warning("batch %s from an earlier run is gone; submitting a new one", previous["batch_id"])

        requests = [{"custom_id": key, "params": self._request_params(item)} for key, item in chunk]
        batch = self._call_or_stop(lambda: client.messages.batches.create(requests=requests),
                                   "messages.batches.create")
        if self.cache:
            self.cache.put_batch_record(batch_key, {"batch_id": batch.id, "state": "submitted",
                                                    "n_requests": len(chunk)})
        log.info("submitted batch %s with %d requests to %s", batch.id, len(chunk), self.spec.model)
        return batch.id

    def _collect_batch(self, client: anthropic.Anthropic, batch, chunk: list[tuple[str, JudgeItem]],
                       record: Record) -> None:
        lines = self._call_or_stop(lambda: list(client.messages.batches.results(batch.id)),
                                   "messages.batches.results")
        expected = {key for key, _ in chunk}
        seen: set[str] = set()
        for line in lines:
            if line.custom_id in expected and line.custom_id not in seen:
                seen.add(line.custom_id)
                record(line.custom_id, self._verdict_from_batch_result(line.result))
        for key in expected - seen:
            record(key, Verdict(error=BATCH_MISSING, raw=f"no result line for this request in batch {batch.id}"))
        log.info("batch %s ended: %s", batch.id, batch.request_counts)
