"""The stage registry: every module in ``jobs/`` that defines ``SPEC`` is a stage.

Images, the Argo templates and the CI build matrix are all derived from this, so a new stage cannot be forgotten.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

import jobs
from shared.contract.stage import StageSpec
from shared.core.config import ConfigError

NOT_STAGES = {"registry"}


@cache
def all_stages() -> dict[str, StageSpec]:
    stages: dict[str, StageSpec] = {}
    for info in pkgutil.iter_modules(jobs.__path__):
        if info.name.startswith("_") or info.name in NOT_STAGES:
            continue
        module = importlib.import_module(f"jobs.{info.name}")
        spec = getattr(module, "SPEC", None)
        if not isinstance(spec, StageSpec):
            raise TypeError(f"jobs/{info.name}.py defines no SPEC = StageSpec(...)")
        if spec.name != info.name:
            raise TypeError(f"jobs/{info.name}.py declares stage name {spec.name!r}; it must match the module")
        stages[spec.name] = spec
    return stages


def get(name: str) -> StageSpec:
    stages = all_stages()
    if name not in stages:
        raise ConfigError(f"unknown stage {name!r}; known: {', '.join(sorted(stages))}")
    return stages[name]
