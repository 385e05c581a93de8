"""What a judge is: its kind, model, template and the knobs of its transport, as one pydantic model."""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
    ``kind="local"``: ``model`` is a ``shared.lm.models`` reference such as ``tiny:qwen2``; the verdict is read from the
    model's probabilities of the valid replies (``local_method``: each whole reply's likelihood, or the first
    token's), and the item is an abstention where those replies hold less than ``min_candidate_mass`` of the
    probability (see shared/judge/local.py).

    ``template`` is a shipped template's name or a path to the user's own (``shared.judge.templates``). Making a
    spec pins the template's content hash in ``template_sha256``: a stage config that embeds the spec is then keyed
    by the template's content, not only by its name or path, and a spec whose pinned hash no longer matches the
    files (a template edited after the plan was built) is refused with one readable line.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["anthropic", "local"]
    model: str = Field(min_length=1)
    template: str = "alignment_v1"
    template_sha256: str | None = None  # filled in when the spec is made; checked when a stage reads it back
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
    # local judge: how many candidate continuations go through the model in one forward pass; every pass recomputes
    # the whole prompt, so the default holds a 0-100 range and its sentinel words in one
    candidate_batch_size: int = Field(256, ge=1)
    # local judge: the dtype to load the model in (None: the checkpoint's own); part of the cache key when set
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # local judge: "full_reply" scores each valid reply (a number, a sentinel word) by the likelihood of all its
    # tokens and the end of turn; "first_token" by its first token only (Betley et al.'s logprob judge), which needs
    # every score of the range to be one token of the judge's tokenizer
    local_method: Literal["full_reply", "first_token"] = "full_reply"
    # local judge: below this total probability on the valid replies the judge abstains (an error, never a score);
    # 0.25 as in Betley et al.'s logprob judge
    min_candidate_mass: float = Field(0.25, ge=0, le=1)

    @field_validator("template")
    @classmethod
    def _template_ref(cls, ref: str) -> str:
        from shared.judge.templates import resolve_ref

        return resolve_ref(ref)

    @model_validator(mode="after")
    def _pin_template(self) -> JudgeSpec:
        from shared.judge.errors import JudgeConfigError
        from shared.judge.templates import load_template

        try:
            sha = load_template(self.template).sha256
        except JudgeConfigError as err:
            raise ValueError(str(err)) from None
        if self.template_sha256 is None:
            object.__setattr__(self, "template_sha256", sha)  # frozen: set once, while the spec is being made
        elif self.template_sha256 != sha:
            raise ValueError(f"judge template {self.template!r} has changed since this spec was made (sha256 "
                             f"{self.template_sha256[:12]}..., now {sha[:12]}...): build the plan again")
        return self

    def template_facts(self) -> dict:
        """What a report says about this judge's template: its name, where it came from, its content hash."""
        from pathlib import Path

        from shared.judge.templates import is_shipped

        shipped = is_shipped(self.template)
        return {"template": self.template if shipped else Path(self.template).name,
                "source": "shipped" if shipped else self.template, "sha256": self.template_sha256}

    def with_template(self, ref: str) -> JudgeSpec:
        """The same judge with another template (its hash pinned afresh)."""
        return JudgeSpec.model_validate({**self.model_dump(), "template": ref, "template_sha256": None})
