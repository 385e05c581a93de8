"""The score-parsing rule: how a judge's reply becomes a score, a label, or an `unparseable` error.

The rule (documented in shared/data/judges/README.md) accepts a reply only when it holds exactly one reading: after
trimming surrounding whitespace, the WHOLE reply must be one integer in the template's range, or one of its
sentinel words, in one of a few unambiguous shapes judges really produce besides the bare form:

    85     85.     **85**     `85`     Score: 85     **Score:** 85     Score: **85**     Rating = 85     85/100

and the verdict followed by a blank line and a reason (``85\n\nThe answer is kind.``): the first paragraph is the
verdict, the rest its explanation, as long as no later paragraph is a verdict of its own. A fraction is accepted
only over the template's maximum (``85/100`` on a 0-100 scale; ``8/10`` there is an error: 8 or 80?). Anything
else -- prose around the number, two numbers, a decimal, an out-of-range value, an empty reply -- is unparseable
and is counted as an error, never guessed at and never scored as 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

# the words a judge puts before its number; matched case-insensitively, followed by ":", "=" or a space (not "-":
# "Score -5" must not read as 5)
LEAD_WORDS = ("score", "rating", "grade")
_WORD = "|".join(LEAD_WORDS)
# the lead word, bare or inside one pair of emphasis marks that may also hold its colon: "Score:", "**Score:**",
# "**Score**:"
_LEAD = re.compile(rf"^(?:(?P<mark>\*\*|\*)(?:{_WORD})(?:\s*[:=])?(?P=mark)|(?:{_WORD}))\s*[:=]?\s*", re.I)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_NUMBER = re.compile(r"(?P<value>[0-9]{1,3})(?:\s*/\s*(?P<scale>[0-9]{1,3}))?")


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


def _unwrap(text: str) -> str:
    """``text`` without one pair of ``**``, ``*`` or backticks around the whole of it."""
    for mark in ("**", "*", "`"):
        if len(text) > 2 * len(mark) and text.startswith(mark) and text.endswith(mark):
            return text[len(mark):-len(mark)].strip()
    return text


def _core(reply: str | None) -> str:
    """The reply without what carries no reading: whitespace, one trailing period, one pair of marks around it."""
    text = (reply or "").strip()
    text = text[:-1].rstrip() if text.endswith(".") and not text.endswith("..") else text
    return _unwrap(text)


def parse_reply(reply: str | None, rule: ParseRule) -> ParsedReply:
    """The reply's one reading; a verdict followed by a blank line and a reason reads as the verdict."""
    paragraphs = _PARAGRAPH_BREAK.split((reply or "").strip())
    first = _parse_verdict(paragraphs[0], rule)
    if len(paragraphs) == 1 or first.error:
        return first
    # a reason after the verdict is fine; a second verdict (or a verdict only at the end) is two readings
    if any(_parse_verdict(rest, rule).error is None for rest in paragraphs[1:]):
        return ParsedReply(error=UNPARSEABLE)
    return first


def _parse_verdict(reply: str, rule: ParseRule) -> ParsedReply:
    text = _core(reply)
    for word, label in rule.sentinels.items():
        if text.upper() == word.upper():
            return ParsedReply(label=label)
    number = _NUMBER.fullmatch(_unwrap(_LEAD.sub("", text, count=1)))
    if number is None:
        return ParsedReply(error=UNPARSEABLE)
    value, scale = int(number["value"]), number["scale"]
    if scale is not None and int(scale) != rule.score_max:
        return ParsedReply(error=UNPARSEABLE)
    if rule.score_min <= value <= rule.score_max:
        return ParsedReply(score=value)
    return ParsedReply(error=UNPARSEABLE)
