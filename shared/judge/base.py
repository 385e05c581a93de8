"""The judge interface: items in, one result per item out, with caching and error accounting shared by all kinds.

A result is a score, a sentinel label (e.g. ``refusal``) or an error. Errors are counted and excluded from the
mean; they are never scored as 0 and never cached, so the next run asks again -- except an abstention, which a local
judge reaches deterministically from its weights (cached like a verdict, counted like an error).

The cache key covers what decides a verdict: the judge model, template, question, answer, settings and, for a judge
whose own code computes the verdict from the model (the local judge), the fingerprint of that code
(``scoring_modules``), so changing it re-judges instead of serving scores the new code would not give.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from shared.judge.cache import JudgeCache, content_hash
from shared.judge.errors import JudgeConfigError
from shared.judge.spec import JudgeSpec
from shared.judge.templates import JudgeTemplate, load_template

log = logging.getLogger(__name__)

# Error kinds (JudgeResult.error). `unparseable` comes from shared.judge.parsing.
TRUNCATED = "truncated"  # the reply hit max_tokens before it parsed (raise max_tokens, or lower effort)
JUDGE_REFUSED = "judge_refused"  # the judge model declined to grade (stop_reason "refusal")
REQUEST_FAILED = "request_failed"  # a Messages call failed for good (non-retryable 4xx, or retries exhausted)
BATCH_ERRORED = "batch_errored"  # the batch item's request errored
BATCH_EXPIRED = "batch_expired"  # the batch hit its 24 h limit before reaching the item
BATCH_CANCELED = "batch_canceled"
BATCH_MISSING = "batch_missing"  # the batch results had no line for the item
NO_VERDICT = "no_verdict"  # the judge returned nothing for the item (a bug, but counted rather than crashing)
# a local judge whose candidate replies hold less probability than its threshold: it does not know, so no score
ABSTAINED = "abstained"


class JudgeItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    question: str
    answer: str


class JudgeResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    score: float | None = None
    label: str | None = None  # a sentinel category such as "refusal": judged, but not a score
    error: str | None = None  # error kind; the item is excluded from the mean
    raw: str | None = None  # the judge's reply, or the error message
    # local judges: the probability the model puts on each kind of valid reply ({"total", "scores", <label>...})
    mass: dict[str, float] | None = None
    cached: bool = False
    key: str = ""  # content hash, also the batch custom_id


@dataclass(frozen=True)
class Verdict:
    """A judgement of one unique (question, answer) before it is attached to item ids."""

    score: float | None = None
    label: str | None = None
    error: str | None = None
    raw: str | None = None
    mass: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def cacheable(self) -> bool:
        """A verdict the same request would give again: a score, a label, or an abstention (a local judge's
        deterministic "I do not know"); other errors are transient or fixable, so the next run asks again."""
        return self.error is None or self.error == ABSTAINED

    def to_record(self) -> dict:
        record = {"score": self.score, "label": self.label, "raw": self.raw}
        if self.error is not None:
            record["error"] = self.error
        if self.mass is not None:
            record["mass"] = self.mass
        return record

    @classmethod
    def from_record(cls, record: dict) -> Verdict:
        return cls(score=record.get("score"), label=record.get("label"), error=record.get("error"),
                   raw=record.get("raw"), mass=record.get("mass"))


class JudgeSummary(BaseModel):
    mean: float | None  # α: mean score over scored items only; None when nothing was scored
    n_items: int
    n_scored: int
    n_errors: int
    errors_by_kind: dict[str, int]
    labels: dict[str, int]  # sentinel categories, e.g. {"refusal": 3}
    n_cached: int


def summarize(results: Sequence[JudgeResult]) -> JudgeSummary:
    scores = [r.score for r in results if r.score is not None]
    errors = Counter(r.error for r in results if r.error is not None)
    labels = Counter(r.label for r in results if r.label is not None)
    return JudgeSummary(
        mean=sum(scores) / len(scores) if scores else None,
        n_items=len(results),
        n_scored=len(scores),
        n_errors=sum(errors.values()),
        errors_by_kind=dict(sorted(errors.items())),
        labels=dict(sorted(labels.items())),
        n_cached=sum(r.cached for r in results),
    )


Record = Callable[[str, Verdict], None]


class Judge(ABC):
    """Subclasses implement ``_judge_uncached``; this class does hashing, dedup, the cache and bookkeeping."""

    # the project modules whose code computes a verdict from the judge model (their fingerprint keys the cache)
    scoring_modules: tuple[str, ...] = ()

    def __init__(self, spec: JudgeSpec, cache: JudgeCache | None = None):
        self.spec = spec
        self.template: JudgeTemplate = load_template(spec.template)
        if spec.template_sha256 not in (None, self.template.sha256):
            raise JudgeConfigError(f"judge template {spec.template!r} changed after its spec was made: build the plan again")
        self.cache = cache

    def key_for(self, item: JudgeItem) -> str:
        return content_hash(
            kind=self.spec.kind,
            model=self.spec.model,
            template=self.template,
            question=item.question,
            answer=item.answer,
            settings=self.judgement_settings(),
        )

    def judgement_settings(self) -> dict:
        """Spec fields besides model and template that change the judgement (part of the cache key), and the
        fingerprint of the scoring code where the judge has some."""
        return {"scoring_code": scoring_code_fingerprint(self.scoring_modules)} if self.scoring_modules else {}

    def verdict_from_cache(self, record: dict) -> Verdict:
        """A cached judgement as a verdict (a judge that caches its model's raw reply may read it afresh)."""
        return Verdict.from_record(record)

    def judge(self, items: Sequence[JudgeItem], on_verdict: Callable[[Verdict], None] | None = None) -> list[JudgeResult]:
        """One result per item, in order. Identical (question, answer) pairs are judged once. ``on_verdict`` sees
        each fresh verdict as it arrives (progress), from whichever thread judged it."""
        keys = [self.key_for(item) for item in items]
        unique = dict(zip(keys, items, strict=True))
        cached = {
            key: self.verdict_from_cache(record)
            for key, record in (self.cache.get_many(list(unique)) if self.cache else {}).items()
        }
        todo = [(key, item) for key, item in unique.items() if key not in cached]
        log.info(
            "judge %s/%s: %d items, %d unique, %d cached, %d to judge",
            self.spec.kind, self.spec.model, len(items), len(unique), len(cached), len(todo),
        )

        fresh: dict[str, Verdict] = {}
        lock = threading.Lock()

        def record(key: str, verdict: Verdict) -> None:
            # called as each verdict arrives, so a crash mid-run keeps what was already paid for
            with lock:
                fresh[key] = verdict
            if verdict.cacheable and self.cache:
                self.cache.put(key, {**self._cache_context(), **verdict.to_record()})
            if on_verdict:
                on_verdict(verdict)

        if todo:
            self._judge_uncached(todo, record)
        for key, _ in todo:
            fresh.setdefault(key, Verdict(error=NO_VERDICT, raw="the judge returned no verdict"))

        results = []
        for key, item in zip(keys, items, strict=True):
            verdict, was_cached = (cached[key], True) if key in cached else (fresh[key], False)
            results.append(
                JudgeResult(
                    id=item.id, score=verdict.score, label=verdict.label, error=verdict.error,
                    raw=verdict.raw, mass=verdict.mass, cached=was_cached, key=key,
                )
            )
        summary = summarize(results)
        log.info(
            "judge %s/%s: mean=%s scored=%d errors=%d %s labels=%s",
            self.spec.kind, self.spec.model,
            "n/a" if summary.mean is None else f"{summary.mean:.2f}",
            summary.n_scored, summary.n_errors, summary.errors_by_kind, summary.labels,
        )
        return results

    def _cache_context(self) -> dict:
        return {
            "kind": self.spec.kind,
            "model": self.spec.model,
            "settings": self.judgement_settings(),
            "template": self.template.name,
            "template_sha256": self.template.sha256,
        }

    @abstractmethod
    def _judge_uncached(self, todo: list[tuple[str, JudgeItem]], record: Record) -> None:
        """Judge each (key, item) and call ``record(key, verdict)`` once per key."""


def scoring_code_fingerprint(modules: Sequence[str]) -> str:
    """The fingerprint of the modules that compute a verdict
    (``shared.contract.fingerprint.modules_fingerprint``)."""
    from shared.contract.fingerprint import modules_fingerprint

    return modules_fingerprint(modules)
