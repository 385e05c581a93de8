"""Experiments as plans: one module per experiment, two engines that run any plan."""

from __future__ import annotations

import importlib

from shared.core.config import ConfigError

WORKFLOWS = ("issue164", "issue81", "issue205", "issue170")


def load(name: str):
    """The workflow module for ``name``; it defines ``Params`` and ``build(params, profile=, run_id=, store=)``."""
    if name not in WORKFLOWS:
        raise ConfigError(f"unknown workflow {name!r}: choose one of {', '.join(WORKFLOWS)}")
    try:
        return importlib.import_module(f"workflows.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"workflows.{name}":
            raise ConfigError(f"workflow {name!r} is not implemented yet") from None
        raise
