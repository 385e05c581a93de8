"""Parameters you can find: ``python -m workflows params WORKFLOW --profile P`` lists every parameter of a workflow
with its value in that profile and its one-line description (the pydantic ``Field(description=...)`` of its
``Params``), and a mistyped ``--set`` key is answered with the nearest names.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from shared.core.config import ConfigError

NO_DESCRIPTION = "(no description yet)"
VALUE_WIDTH = 48  # longer values (question lists, nested settings) are cut in the listing; --json has them whole


@dataclass
class Parameter:
    name: str
    value: Any
    description: str | None
    default: Any

    @property
    def changed_by_profile(self) -> bool:
        return self.value != self.default


def _dumped(value: Any) -> Any:
    return to_jsonable_python(value)


def parameters(params_cls: type[BaseModel], profile: str) -> list[Parameter]:
    """Every field of ``params_cls`` with its value in ``profile`` (defaults plus the profile's overrides)."""
    values = params_cls.for_profile(profile)
    out = []
    for name, info in params_cls.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        out.append(Parameter(name, _dumped(getattr(values, name)), _one_line(info.description), _dumped(default)))
    return out


def _one_line(text: str | None) -> str | None:
    return " ".join(text.split()) if text and text.strip() else None


def missing_descriptions(params_cls: type[BaseModel]) -> list[str]:
    """The parameters of ``params_cls`` that have no description."""
    return [name for name, info in params_cls.model_fields.items() if not _one_line(info.description)]


def _short(value: Any, width: int = VALUE_WIDTH) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def listing(workflow: str, profile: str, params: list[Parameter]) -> str:
    """The table ``params`` prints: name, value in the profile (``*`` where the profile changes the default),
    description."""
    name_w = max(len(p.name) for p in params)
    value_w = min(VALUE_WIDTH, max(len(_short(p.value)) for p in params))
    lines = [f"{workflow} parameters, {profile} profile (--set NAME=VALUE; * = this profile's value, not the default)",
             ""]
    for p in params:
        mark = "*" if p.changed_by_profile else " "
        lines.append(f"  {p.name:<{name_w}}  {mark} {_short(p.value):<{value_w}}  {p.description or NO_DESCRIPTION}")
    missing = sum(p.description is None for p in params)
    if missing:
        lines += ["", f"{missing} of {len(params)} parameters have no description yet"]
    return "\n".join(lines)


def as_json(params: list[Parameter]) -> str:
    return json.dumps([{"name": p.name, "value": p.value, "default": p.default, "description": p.description}
                       for p in params], indent=2, default=str)


def check_known(workflow: str, params_cls: type[BaseModel], overrides: dict[str, Any]) -> None:
    """A ``--set`` key that is no parameter: one error line with the nearest names (difflib), before anything runs."""
    known = list(params_cls.model_fields)
    for key in overrides:
        if key in params_cls.model_fields:
            continue
        near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        if not near:  # a part of the name: "steps" -> soft_steps, gcg_steps
            near = [k for k in known if key.lower() in k.lower()][:3]
        hint = f"did you mean {' or '.join(near)}?" if near else "no parameter has a similar name"
        raise ConfigError(f"unknown parameter {key!r} of {workflow}: {hint} "
                          f"(`python -m workflows params {workflow}` lists them all)")
