"""Judge prompt templates: project-written data files under shared/data/judges/.

A template ``<name>`` is three files: ``<name>.system.txt`` (the judge's system prompt), ``<name>.user.txt``
(the user turn, with ``{question}`` and ``{answer}`` placeholders) and ``<name>.parse.json`` (its parse rule).
The template hash covers all three, so editing any of them invalidates cached judgements made with the old text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from pydantic import ValidationError

from shared.judge.errors import JudgeConfigError
from shared.judge.parsing import ParseRule

PLACEHOLDERS = ("{question}", "{answer}")


def _templates_dir():
    return resources.files("shared").joinpath("data", "judges")


def available_templates() -> list[str]:
    return sorted(p.name[: -len(".system.txt")] for p in _templates_dir().iterdir() if p.name.endswith(".system.txt"))


@dataclass(frozen=True)
class JudgeTemplate:
    name: str
    system: str
    user: str
    parse_rule: ParseRule
    sha256: str

    def render_user(self, question: str, answer: str) -> str:
        # str.replace, not str.format: questions and answers may contain braces
        return self.user.replace("{question}", question).replace("{answer}", answer)


@cache
def load_template(name: str) -> JudgeTemplate:
    folder = _templates_dir()
    files = {part: folder.joinpath(f"{name}.{part}") for part in ("system.txt", "user.txt", "parse.json")}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise JudgeConfigError(
            f"unknown judge template {name!r} (missing {', '.join(missing)}); available: {available_templates()}"
        )
    texts = {part: f.read_text(encoding="utf-8") for part, f in files.items()}
    for placeholder in PLACEHOLDERS:
        if texts["user.txt"].count(placeholder) != 1:
            raise JudgeConfigError(f"judge template {name!r}: user.txt must contain {placeholder} exactly once")
    try:
        rule = ParseRule.model_validate(json.loads(texts["parse.json"]))
    except (ValueError, ValidationError) as err:
        reason = str(err).splitlines()[-1].strip() if str(err) else type(err).__name__
        raise JudgeConfigError(f"judge template {name!r}: bad parse.json ({reason})") from None
    digest = hashlib.sha256()
    for part in ("system.txt", "user.txt", "parse.json"):
        digest.update(part.encode() + b"\0" + texts[part].encode() + b"\0")
    return JudgeTemplate(
        name=name,
        system=texts["system.txt"].strip(),
        user=texts["user.txt"].strip(),
        parse_rule=rule,
        sha256=digest.hexdigest(),
    )
