"""What a judge is: its kind, model, template and the knobs of its transport, as one pydantic model."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RetryPolicy(BaseModel):
    """Retries for one API call on 429 (rate limited), 529 (overloaded), other 5xx, 408 and connection errors.

    Attempt n (1-based) that fails waits ``min(max_delay_s, initial_delay_s * multiplier**(n-1))``, scaled by a
    random factor in [0.5, 1] so parallel workers do not retry in lockstep; a ``retry-after`` header from the
    server takes precedence (capped at ``max_delay_s``). Other 4xx are not retried.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(8, ge=1)
    initial_delay_s: float = Field(1.0, ge=0)
    max_delay_s: float = Field(60.0, ge=0)
    multiplier: float = Field(2.0, ge=1)

    def delay_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None and retry_after_s >= 0:
            return min(retry_after_s, self.max_delay_s)
        backoff = min(self.max_delay_s, self.initial_delay_s * self.multiplier ** (attempt - 1))
        return backoff * random.uniform(0.5, 1.0)


class JudgeSpec(BaseModel):
    """A judge configuration; stage configs embed it.

    ``kind="anthropic"``: ``model`` is a Claude model id; ``thinking`` and ``effort`` are sent as given. Fewer
    than ``batch_threshold`` uncached items go through the Messages API on ``max_concurrency`` threads; more go
    through Message Batches (half price, minutes to hours), polled every ``poll_interval_s``.
    ``kind="local"``: ``model`` is a ``shared.models`` reference such as ``tiny:qwen2``; the score is the
    probability-weighted mean over the candidate scores (see shared/judge/local.py).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["anthropic", "local"]
    model: str = Field(min_length=1)
    template: str = "alignment_v1"
    # Thinking tokens count towards max_tokens, so leave room even though the reply is one word; a reply cut
    # off by the limit is a `truncated` error.
    max_tokens: int = Field(2048, ge=1)
    # The API takes no sampling parameters (temperature etc.) any more; thinking is what remains to choose.
    # "default" sends nothing (the model's own default); not every model accepts "disabled".
    thinking: Literal["default", "disabled", "adaptive"] = "default"
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    batch_threshold: int = Field(100, ge=1)
    max_concurrency: int = Field(8, ge=1)
    poll_interval_s: float = Field(30.0, gt=0)
    # batches end within 24 h; past this we stop polling and fail (a re-run resumes the same batch)
    batch_timeout_s: float = Field(25 * 3600, gt=0)
    max_batch_requests: int = Field(10_000, ge=1, le=100_000)
    request_timeout_s: float = Field(120.0, gt=0)
    retry: RetryPolicy = RetryPolicy()
    # local judge: how many candidate continuations go through the model in one forward pass
    candidate_batch_size: int = Field(101, ge=1)
    # local judge: the dtype to load the model in (None: the checkpoint's own); part of the cache key when set
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
