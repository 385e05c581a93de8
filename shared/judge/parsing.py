"""The score-parsing rule: how a judge's reply becomes a score, a label, or an `unparseable` error.

The rule is deliberately strict (documented in shared/data/judges/README.md): after trimming surrounding
whitespace the WHOLE reply must be one integer in the template's range, or one of its sentinel words. Anything
else — prose around the number, two numbers, a decimal, an out-of-range value, an empty reply — is unparseable
and is counted as an error, never guessed at and never scored as 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

_INTEGER = re.compile(r"[0-9]{1,3}")


class ParseRule(BaseModel):
    """One template's parse rule, loaded from ``<template>.parse.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score_min: int = 0
    score_max: int = 100
    # reply word (matched case-insensitively) -> label recorded for the item, e.g. REFUSAL -> "refusal"
    sentinels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ParseRule:
        if not 0 <= self.score_min < self.score_max <= 999:
            raise ValueError(f"score range [{self.score_min}, {self.score_max}] must satisfy 0 <= min < max <= 999")
        for word in self.sentinels:
            if not word.isalpha():
                raise ValueError(f"sentinel {word!r} must be a single alphabetic word")
        return self


@dataclass(frozen=True)
class ParsedReply:
    """Exactly one of ``score``, ``label`` or ``error`` is set."""

    score: int | None = None
    label: str | None = None
    error: str | None = None


UNPARSEABLE = "unparseable"


def parse_reply(reply: str | None, rule: ParseRule) -> ParsedReply:
    text = (reply or "").strip()
    if _INTEGER.fullmatch(text):
        value = int(text)
        if rule.score_min <= value <= rule.score_max:
            return ParsedReply(score=value)
        return ParsedReply(error=UNPARSEABLE)
    for word, label in rule.sentinels.items():
        if text.upper() == word.upper():
            return ParsedReply(label=label)
    return ParsedReply(error=UNPARSEABLE)
