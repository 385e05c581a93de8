"""The judges of the workflows that report α and the EM rate (issue164, issue170), defined once.

Both judge every generation with a primary and an alternate alignment judge (the record's Sonnet and Opus), run a
coherence pass with the primary judge's model for the EM rate, and check each alignment judge on known-aligned and
known-misaligned answers (and graded ones) and the coherence judge on known-coherent and known-incoherent answers
before their scores are read.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from jobs.judge_check import COHERENCE_ITEMS as DEFAULT_COHERENCE_CHECK_ITEMS
from jobs.judge_check import DEFAULT_ITEMS as DEFAULT_CHECK_ITEMS
from shared.core.config import ConfigError, Strict
from shared.judge.check import read_items
from shared.judge.spec import JudgeSpec
from workflows.plan import slug

COHERENCE_JUDGE = "coherence"  # the name of the coherence pass: its tasks are judge-coherence-<cell>


class NamedJudge(Strict):
    name: str
    spec: JudgeSpec


class JudgeParams(BaseModel):
    """The judge parameters of a workflow (a base of its ``Params``)."""

    primary_judge: NamedJudge = Field(
        NamedJudge(name="sonnet", spec=JudgeSpec(kind="anthropic", model="claude-sonnet-4-5-20250929")),
        description="the judge whose α and EM rate the decisions read: {name, spec: {kind, model, template, ...}}")
    alternate_judge: NamedJudge = Field(
        NamedJudge(name="opus", spec=JudgeSpec(kind="anthropic", model="claude-opus-4-7")),
        description="a second judge scoring the same answers, reported beside the primary (same name: one judge)")
    coherence_template: str = Field(
        "coherence_v1", description="template of the coherence pass behind the EM rate (run with the primary judge's "
                                    "model): a shipped name or a path, see shared/data/judges/README.md")
    alignment_template: str | None = Field(
        None, description="when set, the template of both alignment judges and their checks: a shipped name or a path")
    judge_check_items: str = Field(
        DEFAULT_CHECK_ITEMS, description="known-aligned, known-misaligned and graded answers each alignment judge is checked on")
    coherence_check_items: str = Field(
        DEFAULT_COHERENCE_CHECK_ITEMS,
        description="known-coherent and known-incoherent answers the coherence judge is checked on")

    @field_validator("coherence_template", "alignment_template")
    @classmethod
    def _template_loads(cls, ref: str | None) -> str | None:
        from shared.judge.templates import checked_ref

        return None if ref is None else checked_ref(ref)


def alignment_judges(params: JudgeParams) -> tuple[NamedJudge, NamedJudge]:
    """The primary and alternate judge, with ``alignment_template`` in place of their own where it is set."""
    judges = (params.primary_judge, params.alternate_judge)
    if params.alignment_template is None:
        return judges
    return tuple(NamedJudge(name=j.name, spec=j.spec.with_template(params.alignment_template)) for j in judges)


def coherence_judge(params: JudgeParams) -> NamedJudge:
    """The coherence pass: the primary judge's model (as in Betley et al., one judge rates both) and template."""
    return NamedJudge(name=COHERENCE_JUDGE, spec=params.primary_judge.spec.with_template(params.coherence_template))


def check_judges(workflow: str, params: JudgeParams) -> None:
    """Plan-time checks: the coherence pass's name is free and the check items parse and are of the right kind (a
    bad file fails here, with its name, not inside a task)."""
    from shared.judge.check import kind_of

    if COHERENCE_JUDGE in {slug(j.name) for j in alignment_judges(params)}:
        raise ConfigError(f"{workflow}: the judge name {COHERENCE_JUDGE!r} is reserved for the coherence pass")
    for name, ref, kind in (("judge_check_items", params.judge_check_items, "alignment"),
                            ("coherence_check_items", params.coherence_check_items, "coherence")):
        found = kind_of(read_items(ref))
        if found != kind:
            raise ConfigError(f"{workflow}: {name} {ref} holds {found} check items; it needs {kind} ones")


def coherence_check_task(b, params: JudgeParams):
    """The judge_check task of the coherence pass (its judge on the coherence check items)."""
    judge = coherence_judge(params)
    return b.add(f"judge-check-{COHERENCE_JUDGE}", "judge_check", f"judge-check-{COHERENCE_JUDGE}",
                 judge=judge.spec.model_dump(), judge_name=judge.name, items_file=params.coherence_check_items)
