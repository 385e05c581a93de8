"""Explicit retries around Anthropic SDK calls (the SDK's own retries are switched off so this policy is the one
that runs, is configurable through JudgeSpec.retry, and is visible in the logs)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import anthropic

from shared.judge.spec import RetryPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUSES = frozenset({408, 409, 429})  # plus every 5xx, 529 "overloaded" included


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


def retry_after_s(headers) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or numeric ``retry-after``), if it said."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return float(value) * scale
            except ValueError:
                continue
    return None


def call_with_retries(
    call: Callable[[], T],
    policy: RetryPolicy,
    *,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Run ``call``; on a retryable failure wait and try again, up to ``policy.max_attempts`` tries in all.

    The last failure, or any non-retryable one, propagates unchanged for the caller to classify.
    """
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return call()
        except anthropic.APIStatusError as err:
            if not is_retryable_status(err.status_code) or attempt == policy.max_attempts:
                raise
            delay = policy.delay_s(attempt, retry_after_s(err.response.headers))
            reason = f"HTTP {err.status_code}"
        except anthropic.APIConnectionError as err:  # includes timeouts
            if attempt == policy.max_attempts:
                raise
            delay = policy.delay_s(attempt)
            reason = type(err).__name__
        log.warning("%s: %s; retry %d/%d in %.2fs", what, reason, attempt, policy.max_attempts - 1, delay)
        if on_retry:
            on_retry()
        sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
