"""Model-graded scoring: Claude through the Anthropic API, or a local model offline.

    judge = make_judge(JudgeSpec(kind="anthropic", model="claude-sonnet-4-5-20250929"), cache_uri)
    results = judge.judge([JudgeItem(id="q1-s0", question=..., answer=...), ...])
    summary = summarize(results)   # summary.mean is α over scored items; errors are counted, not scored

Templates and the parse rule are data: shared/data/judges/ (see its README.md).

May import: shared.core, shared.contract, shared.lm, shared.analysis
"""

from __future__ import annotations

from shared.judge.base import Judge, JudgeItem, JudgeResult, JudgeSummary, summarize
from shared.judge.cache import JudgeCache, content_hash
from shared.judge.errors import JudgeAuthError, JudgeConfigError, JudgeError
from shared.judge.parsing import ParsedReply, ParseRule, parse_reply
from shared.judge.spec import JudgeSpec, RetryPolicy
from shared.judge.templates import JudgeTemplate, available_templates, load_template

__all__ = [
    "Judge", "JudgeAuthError", "JudgeCache", "JudgeConfigError", "JudgeError", "JudgeItem", "JudgeResult",
    "JudgeSpec", "JudgeSummary", "JudgeTemplate", "ParseRule", "ParsedReply", "RetryPolicy",
    "available_templates", "content_hash", "load_template", "make_judge", "parse_reply", "summarize",
]


def make_judge(spec: JudgeSpec, cache_uri: str | None = None) -> Judge:
    """The judge a spec describes; with ``cache_uri`` (a store URI) its judgements are cached there."""
    cache = JudgeCache(cache_uri, spec.model) if cache_uri else None
    if spec.kind == "anthropic":
        from shared.judge.claude import AnthropicJudge

        return AnthropicJudge(spec, cache)
    from shared.judge.local import LocalJudge

    return LocalJudge(spec, cache)
