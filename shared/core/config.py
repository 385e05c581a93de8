"""Typed configuration: stage configs, experiment parameters and the three profiles.

Every config is a pydantic model that forbids unknown fields, so a typo is an error, not a silent default.
``parse`` turns any validation failure into one readable line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pydantic
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, ValidationError, model_validator

# tiny: random tiny model, proves code paths (the test suite); small: SmolLM2-135M-Instruct on a CPU, real
# small-scale results (what `make run` runs); full: the records' parameters on Qwen2.5-7B-Instruct and GPUs
PROFILES = ("tiny", "small", "full")


class ConfigError(ValueError):
    """A config or parameter is invalid; the message is one readable line."""


def _first_error_line(err: ValidationError, what: str) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{msg}" if loc == "(root)" else f"{loc}: {msg}")
    more = f" (+{err.error_count() - 3} more)" if err.error_count() > 3 else ""
    return f"bad {what}: " + "; ".join(parts) + more


@contextmanager
def plan_errors(workflow: str) -> Iterator[None]:
    """While a workflow builds its plan: a record that does not fit its model is one ConfigError line too.

    Workflow modules validate the records of the files they read (conditions, panels, personas) with pydantic
    models; a missing or mistyped field there is bad input like any other, not a traceback.
    """
    try:
        yield
    except ValidationError as err:
        raise ConfigError(_first_error_line(err, f"{err.title} in a file or parameter of {workflow}")) from None


RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_run_id(run_id: str) -> str:
    """A run id names a folder in the store and an Argo label: letters, digits, '.', '_' and '-'."""
    if not RUN_ID.match(run_id or ""):
        raise ConfigError(f"bad run id {run_id!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return run_id


def parse(model_cls: type[BaseModel], data: Any, what: str | None = None):
    what = what or model_cls.__name__
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_first_error_line(err, what)) from None


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


ARTIFACT = "artifact:"  # a model reference to a model folder in the store (shared.lm.models)


def is_store_uri(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith("file://") or value.startswith("s3://"))


ARTIFACT_REF = "artifact:"  # a model (or adapter) reference to stored content: artifact:<store URI>


def stored_reference(value: Any) -> str | None:
    """The store URI a config value names (a store URI, or ``artifact:<store URI>``), or None."""
    if is_store_uri(value):
        return value
    if isinstance(value, str) and value.startswith(ARTIFACT_REF) and is_store_uri(value[len(ARTIFACT_REF):]):
        return value[len(ARTIFACT_REF):]
    return None


# Ranges every experiment parameter and stage config obeys by its field's name, so that a new workflow or stage
# gets them without repeating Field(...) constraints (which a model may still add for anything else).
# how many (n, eval_n, n_completions, data_n_per_question, max_new_tokens, batch_size, ...): at least 1
COUNT = re.compile(r"^([a-z0-9_]+_)?(n|n_[a-z0-9_]+|max_new_tokens|batch_size)$")
COUNT_SUFFIX = re.compile(r"_per_(question|step)$")  # not per_cell: 0 coherence checks per cell is "none"
NON_EMPTY = re.compile(r"^([a-z0-9_]*questions|personas|conditions|cells|probes|layers)$")  # what to run over
PROBABILITY = re.compile(r"^([a-z0-9_]+_)?top_p$")  # in (0, 1]
NON_NEGATIVE = re.compile(r"^([a-z0-9_]+_)?(temperature|seed)$")
SEED_LIST = re.compile(r"^([a-z0-9_]+_)?seeds$")  # every seed of a list: numpy and torch take none below 0


def non_finite(value: Any, path: str = "") -> str | None:
    """The first place in ``value`` (at any depth) holding NaN or an infinity, or None.

    JSON has no such numbers and no experiment parameter means one; ``temperature=Infinity`` would sample
    uniform noise and write manifests no strict JSON reader accepts.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(value)"
    if isinstance(value, dict):
        return next((p for k, v in value.items() if (p := non_finite(v, f"{path}.{k}" if path else str(k)))), None)
    if isinstance(value, (list, tuple)):
        return next((p for i, v in enumerate(value) if (p := non_finite(v, f"{path}[{i}]"))), None)
    return None


def convention_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is out of range for a field called ``name``, or None."""
    if isinstance(value, bool):
        return None
    if (COUNT.match(name) or COUNT_SUFFIX.search(name)) and isinstance(value, int) and value < 1:
        return f"must be at least 1 (got {value})"
    if NON_EMPTY.match(name) and isinstance(value, (list, dict)) and not value:
        return "must not be empty"
    if PROBABILITY.match(name) and isinstance(value, (int, float)) and not 0 < value <= 1:
        return f"must be in (0, 1] (got {value})"
    if NON_NEGATIVE.match(name) and isinstance(value, (int, float)) and value < 0:
        return f"must be at least 0 (got {value})"
    if SEED_LIST.match(name) and isinstance(value, list) and any(isinstance(v, int) and v < 0 for v in value):
        return f"must all be at least 0 (got {value})"
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)

    @model_validator(mode="after")
    def _conventional_ranges(self):
        for name in type(self).model_fields:
            value = getattr(self, name)
            where = non_finite(value.model_dump() if isinstance(value, BaseModel) else value, name)
            if where:
                raise ValueError(f"{where} must be a finite number (NaN and infinities mean no experiment)")
            problem = convention_problem(name, value)
            if problem:
                raise ValueError(f"{name} {problem}")
        return self


class StageConfig(Strict):
    """Fields every stage config has; stage configs subclass this.

    Input artifacts are every store URI the config holds (and every ``artifact:<store URI>`` model reference),
    whatever the field is called: the manifest records them with their sha256, and a stage is skipped only when
    they are unchanged.
    """

    store: str
    run_id: str
    cell: str
    seed: int = 42

    @model_validator(mode="before")
    @classmethod
    def _records_name_only_their_fields(cls, data: Any) -> Any:
        # The records a stage config holds (questions, personas, cells, artifact lists) are written by a workflow,
        # which keeps from a data file only the fields the stage uses (shared.core.datafiles.read_questions
        # and the workflows' own readers drop a file's extra metadata there). An unknown key that reaches a
        # stage config is therefore a typo or a bug, and a model that ignored it would drop the field
        # silently: it is an error at every depth, whatever the nested model says, unless that model sets
        # ``extra`` itself, for a reason.
        where = unknown_key(cls, data)
        if where:
            raise ValueError(f"{where}: Extra inputs are not permitted")
        return data

    def config_hash(self) -> str:
        return stable_hash(self.model_dump(mode="json"))

    def input_uris(self) -> dict[str, str]:
        """Every stored artifact the config names, at any depth, keyed by its field path: each store URI and each
        ``artifact:<store URI>`` model reference, whatever its field is called (``store`` itself is the root)."""
        found: dict[str, str] = {}

        def walk(value: Any, path: str) -> None:
            if isinstance(value, str):
                uri = stored_reference(value)
                if uri is not None:
                    found[path] = uri
            elif isinstance(value, dict):
                for key, item in value.items():
                    walk(item, f"{path}.{key}" if path else str(key))
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    walk(item, f"{path}[{i}]")

        walk({k: v for k, v in self.model_dump(mode="json").items() if k != "store"}, "")
        return found


class ExperimentParams(Strict):
    """Parameters of one experiment; ``PROFILES`` holds the per-profile values that differ from the defaults."""

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {name: {} for name in PROFILES}

    @classmethod
    def for_profile(cls, profile: str, overrides: dict[str, Any] | None = None):
        if profile not in cls.PROFILES:
            raise ConfigError(f"unknown profile {profile!r}: choose one of {', '.join(cls.PROFILES)}")
        values = {**cls.PROFILES[profile], **(overrides or {})}
        unknown = sorted(set(overrides or {}) - set(cls.model_fields))
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r} for {cls.__name__}; known: {', '.join(cls.model_fields)}")
        return parse(cls, values, f"{cls.__name__} ({profile} profile)")


class ReplicatedParams(ExperimentParams):
    """Parameters of an experiment that trains: every training cell runs once per training seed.

    A seed is one more fan-out dimension (separate tasks, separate cache keys), so adding a seed later computes
    only that seed, and claims about a training recipe are tested across seeds, not across samples of one run.
    ``seeds`` names the seeds explicitly; otherwise ``replicates`` seeds count up from ``seed``.
    """

    seed: NonNegativeInt = pydantic.Field(42, description="training seed of a one-seed run, and the first of replicates")
    replicates: PositiveInt = pydantic.Field(1, description="training seeds per training cell, counting up from seed")
    seeds: list[NonNegativeInt] | None = pydantic.Field(
        None, description="the training seeds, listed (instead of seed and replicates); one task per cell and seed")

    @model_validator(mode="after")
    def _one_seed_list(self):
        if self.seeds is not None:
            if not self.seeds:
                raise ValueError("seeds must not be empty (leave it unset to count replicates up from seed)")
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds must be distinct (got {self.seeds})")
            if "replicates" in self.model_fields_set and self.replicates != len(self.seeds):
                raise ValueError(f"replicates={self.replicates} but {len(self.seeds)} seeds are listed: give one of them")
        return self

    def training_seeds(self) -> list[int]:
        """The seeds every training cell runs with, in order (the first is the single-seed run's seed)."""
        return list(self.seeds) if self.seeds is not None else [self.seed + i for i in range(self.replicates)]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs from the command line; values are JSON when they parse as JSON, else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"bad --set {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


@dataclass
class PlanCheck:
    """What a stage's plan-time check found (``StageSpec.plan_check``): ``problems``, one line each, which stop the
    plan; and ``(model ref, why)`` for each value that could not be checked here, which the plan reports in one
    warning line while the stage checks them itself before it computes."""

    problems: list[str] = field(default_factory=list)
    unchecked: list[tuple[str, str]] = field(default_factory=list)


def unknown_key(model: type[BaseModel], data: Any, path: str = "") -> str | None:
    """The dotted path of the first key in ``data`` (the raw input of ``model``) that a model nested in it does not
    declare, or None. Models that set ``extra`` themselves are left to it (pydantic refuses for ``forbid``); the
    top level is the caller's own (``Strict`` forbids there)."""
    if not isinstance(data, dict):
        return None
    if path and model.model_config.get("extra") is None:
        known = set()
        for name, info in model.model_fields.items():
            known |= {name, *(a for a in (info.alias, info.validation_alias) if isinstance(a, str))}
        for key in data:
            if key not in known:
                return f"{path}.{key}"
    for name, info in model.model_fields.items():
        key = name if name in data else info.alias if info.alias in data else None
        if key is not None:
            found = _unknown_key_in(info.annotation, data[key], f"{path}.{key}" if path else key)
            if found:
                return found
    return None


def _unknown_key_in(annotation: Any, value: Any, path: str) -> str | None:
    """``unknown_key`` for a value of any annotation: models, and models inside lists, tuples, dicts and unions."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _unknown_key_in(args[0], value, path)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        others = [a for a in args if a not in models and a is not type(None)]
        if len(models) == 1 and isinstance(value, dict):
            return _unknown_key_in(models[0], value, path)
        return next((p for a in others if (p := _unknown_key_in(a, value, path))), None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return unknown_key(annotation, value, path)
    if origin in (list, tuple, set, frozenset) and isinstance(value, (list, tuple)) and args:
        return next((p for i, item in enumerate(value) if (p := _unknown_key_in(args[0], item, f"{path}.{i}"))), None)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return next((p for k, item in value.items() if (p := _unknown_key_in(args[1], item, f"{path}.{k}"))), None)
    return None
