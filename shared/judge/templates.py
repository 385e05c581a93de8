"""Judge prompt templates: data files, shipped under shared/data/judges/ or the user's own.

A template is three files that share a stem: ``<stem>.system.txt`` (the judge's system prompt), ``<stem>.user.txt``
(the user turn, with ``{question}`` and ``{answer}`` placeholders) and ``<stem>.parse.json`` (its parse rule).
A template reference is either the name of a shipped template (``coherence_v1``) or a path to a stem of the
user's own (``my_judges/coherence_v2``, for the files ``my_judges/coherence_v2.system.txt`` etc.), which is
resolved to an absolute path so that a stage started in another folder reads the same files.

The template hash covers all three files, so editing any of them invalidates cached judgements made with the old
text; a ``JudgeSpec`` pins that hash when it is made (see ``shared.judge.spec``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pydantic import ValidationError

from shared.judge.errors import JudgeConfigError
from shared.judge.parsing import ParseRule

PLACEHOLDERS = ("{question}", "{answer}")
PARTS = ("system.txt", "user.txt", "parse.json")
_SHIPPED_NAME = re.compile(r"[A-Za-z0-9_]+")


def _templates_dir():
    from importlib import resources

    return resources.files("shared").joinpath("data", "judges")


def available_templates() -> list[str]:
    return sorted(p.name[: -len(".system.txt")] for p in _templates_dir().iterdir() if p.name.endswith(".system.txt"))


def is_shipped(ref: str) -> bool:
    """Whether ``ref`` names a shipped template (a bare name) rather than a path to the user's own."""
    return _SHIPPED_NAME.fullmatch(ref) is not None


def resolve_ref(ref: str) -> str:
    """A shipped name as is; a path made absolute (``~`` expanded), without a ``.system.txt`` ending if given."""
    if is_shipped(ref):
        return ref
    for part in PARTS:  # the path of one of the three files names the same template
        ref = ref.removesuffix(f".{part}")
    return str(Path(ref).expanduser().resolve())


def checked_ref(ref: str) -> str:
    """``resolve_ref(ref)`` once the template loads; ValueError (one line) otherwise. For parameter validators."""
    try:
        load_template(resolve_ref(ref))
    except JudgeConfigError as err:
        raise ValueError(str(err)) from None
    return resolve_ref(ref)


@dataclass(frozen=True)
class JudgeTemplate:
    name: str  # the shipped name, or the stem of the user's files
    system: str
    user: str
    parse_rule: ParseRule
    sha256: str
    source: str = ""  # "shipped", or the absolute path stem of the user's files

    def render_user(self, question: str, answer: str) -> str:
        # str.replace, not str.format: questions and answers may contain braces
        return self.user.replace("{question}", question).replace("{answer}", answer)


def load_template(ref: str) -> JudgeTemplate:
    """The template ``ref`` names; JudgeConfigError (one line) if it is missing or malformed."""
    if is_shipped(ref):
        return _load_shipped(ref)
    stem = Path(resolve_ref(ref))
    files = {part: stem.with_name(f"{stem.name}.{part}") for part in PARTS}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise JudgeConfigError(f"judge template {ref!r}: missing {', '.join(missing)} in {stem.parent} (a template "
                               f"path names the stem of three files: <stem>.{', <stem>.'.join(PARTS)})")
    try:
        texts = {part: f.read_text(encoding="utf-8") for part, f in files.items()}
    except (OSError, UnicodeDecodeError) as err:
        raise JudgeConfigError(f"judge template {ref!r}: cannot be read ({err})") from None
    return _parse(stem.name, texts, str(stem))


@cache
def _load_shipped(name: str) -> JudgeTemplate:
    folder = _templates_dir()
    files = {part: folder.joinpath(f"{name}.{part}") for part in PARTS}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise JudgeConfigError(
            f"unknown judge template {name!r} (missing {', '.join(missing)}); available: {available_templates()}, "
            "or a path to your own (see shared/data/judges/README.md)"
        )
    return _parse(name, {part: f.read_text(encoding="utf-8") for part, f in files.items()}, "shipped")


def _parse(name: str, texts: dict[str, str], source: str) -> JudgeTemplate:
    for placeholder in PLACEHOLDERS:
        if texts["user.txt"].count(placeholder) != 1:
            raise JudgeConfigError(f"judge template {name!r}: user.txt must contain {placeholder} exactly once")
    try:
        rule = ParseRule.model_validate(json.loads(texts["parse.json"]))
    except (ValueError, ValidationError) as err:
        reason = str(err).splitlines()[-1].strip() if str(err) else type(err).__name__
        raise JudgeConfigError(f"judge template {name!r}: bad parse.json ({reason})") from None
    digest = hashlib.sha256()
    for part in PARTS:
        digest.update(part.encode() + b"\0" + texts[part].encode() + b"\0")
    return JudgeTemplate(
        name=name,
        system=texts["system.txt"].strip(),
        user=texts["user.txt"].strip(),
        parse_rule=rule,
        sha256=digest.hexdigest(),
        source=source,
    )
