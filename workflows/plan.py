"""A plan: the single definition of a workflow run that both engines execute.

A plan is a list of named tasks, each a stage with a complete config and the tasks it waits for. Task names are
what a person sees in the Argo UI and in the local progress table, so workflows name them after the cell.

A task waits for the tasks whose outputs its config names: ``PlanBuilder.add`` finds every store URI under an
earlier task's output folder (at any depth of the config, as a plain URI or an ``artifact:`` reference) and adds
that edge itself, so a workflow states each dependency once, as the data it reads. An ordering that no data
carries is stated with its reason, ``order_after=[(task, "why")]``, and kept in ``Task.order_reasons``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from graphlib import CycleError, TopologicalSorter
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, Field, PrivateAttr

from jobs import registry
from shared.contract import stage as stage_contract
from shared.contract.lease import Lease
from shared.contract.stage import output_prefix
from shared.core import store
from shared.core.config import ARTIFACT_REF, ConfigError, parse

# Argo task names must be DNS-1123 labels; keep local names identical so both engines show the same thing.
TASK_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def slug(text: str) -> str:
    """A task-name-safe form of a cell label: ``Grid #1 (policy)`` -> ``grid-1-policy``."""
    out = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return out[:63].strip("-") or "x"


def replicate(name: str, seed: int, seeds: Sequence[int]) -> str:
    """The cell or task name of one training seed: ``name`` itself in a one-seed run, else ``<name>-s<seed>``.

    A one-seed run keeps its names; with several seeds every replicate is its own task, visible as such in the
    Argo UI and the local progress table. The cache key does not include the cell, so the first seed's result
    is reused when a run goes from one seed to several.
    """
    return name if len(seeds) == 1 else f"{name}-s{seed}"


def config_strings(value: Any) -> Iterator[str]:
    """Every string in a task config, at any depth (inside dicts, lists and tuples)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from config_strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from config_strings(item)


def named_uri(value: str) -> str:
    """The store URI a config string names: itself, or what follows ``artifact:`` in a model reference."""
    return value[len(ARTIFACT_REF):] if value.startswith(ARTIFACT_REF) else value


class Task(BaseModel):
    name: str
    stage: str
    config: dict[str, Any]
    # every task this one waits for: those whose outputs its config names, then those in ``order_reasons``
    after: list[str] = Field(default_factory=list)
    # the edges no data carries: upstream task name -> why this task must still wait for it
    order_reasons: dict[str, str] = Field(default_factory=dict)

    @property
    def spec(self):
        return registry.get(self.stage)

    def parsed_config(self):
        return parse(self.spec.config, self.config, f"config of task {self.name}")

    def output_prefix(self) -> str:
        return output_prefix(self.parsed_config(), self.stage)

    def output_uri(self, *parts: str) -> str:
        return store.join(self.output_prefix(), *parts)

    def settle(self, warn=lambda _m: None) -> stage_contract.Settled | None:
        """This task's result if the store already holds it (cached here or reused from another run), verified.

        Both engines ask before starting a task: the local engine so that finished tasks cost no process, the
        Argo engine so that they are left out of the workflow. A task whose lease another process holds is left
        to that process (it is working on it).
        """
        cfg = self.parsed_config()
        try:
            inputs = stage_contract.input_hashes(cfg)
        except stage_contract.StageInputError:
            return None  # the stage itself will say which input is missing
        lease = Lease(stage_contract.lease_uri(cfg, self.stage), what=f"{cfg.run_id}/{cfg.cell}/{self.stage} (engine)")
        if not lease.try_acquire():
            return None
        try:
            return stage_contract.settle(self.spec, cfg, warn, inputs=inputs)
        finally:
            lease.release()


class Plan(BaseModel):
    workflow: str
    profile: str
    run_id: str
    store: str
    tasks: list[Task]
    params: dict[str, Any] = Field(default_factory=dict)
    # how the run is watched, not what it computes: not a parameter, never in a task config (so never in a cache
    # key); None leaves it to the environment (shared.contract.tracking)
    tracking: Literal["off", "wandb"] | None = None
    _unchecked: dict[str, tuple[str, int]] = PrivateAttr(default_factory=dict)  # model ref -> (why, slots)

    def model_post_init(self, _context) -> None:
        self.validate_plan()

    def validate_plan(self) -> None:
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"plan {self.workflow}: duplicate task names {duplicates}")
        for task in self.tasks:
            if not TASK_NAME.match(task.name):
                raise ConfigError(f"plan {self.workflow}: task name {task.name!r} is not a DNS label")
            missing = [d for d in task.after if d not in names]
            if missing:
                raise ConfigError(f"plan {self.workflow}: task {task.name} waits for unknown {missing}")
            unlisted = sorted(set(task.order_reasons) - set(task.after))
            if unlisted:
                raise ConfigError(f"plan {self.workflow}: task {task.name} gives reasons to wait for {unlisted} "
                                  "but does not wait for them")
            task.parsed_config()  # every config is checked before anything runs
        self._check_with_models()
        prefixes: dict[str, str] = {}
        for task in self.tasks:  # two tasks writing one folder would each take the other's result for its own
            other = prefixes.setdefault(task.output_prefix(), task.name)
            if other != task.name:
                raise ConfigError(f"plan {self.workflow}: tasks {other} and {task.name} would write the same output "
                                  f"folder {task.output_prefix()}: rename a condition or judge so their cells differ")
        try:
            list(TopologicalSorter(self.graph()).static_order())
        except CycleError as err:
            raise ConfigError(f"plan {self.workflow}: dependency cycle {err.args[1]}") from None

    def _check_with_models(self) -> None:
        """Each stage's plan-time check (``StageSpec.plan_check``: system slots against the model's tokenizer) on
        what is on this machine; the first problem stops the plan, what could not be checked is kept for
        ``unchecked_warning``."""
        unchecked: dict[str, tuple[str, int]] = {}
        for task in self.tasks:
            checked = task.spec.plan_check(task.parsed_config(), fetch=False)
            if checked.problems:
                more = f" (+{len(checked.problems) - 1} more)" if len(checked.problems) > 1 else ""
                raise ConfigError(f"plan {self.workflow}: task {task.name}: {checked.problems[0]}{more}")
            for ref, why in checked.unchecked:
                unchecked[ref] = (why, unchecked.get(ref, ("", 0))[1] + 1)
        self._unchecked = unchecked

    def unchecked_warning(self) -> str | None:
        """One line naming what the plan could not check here (a model's tokenizer not on this machine)."""
        if not self._unchecked:
            return None
        parts = [f"{n} against {ref}: {why}" for ref, (why, n) in sorted(self._unchecked.items())]
        return ("system slots not checked at plan time (their stages check them before computing): "
                + "; ".join(parts))

    def graph(self) -> dict[str, set[str]]:
        return {t.name: set(t.after) for t in self.tasks}

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def stages(self) -> list[str]:
        return sorted({t.stage for t in self.tasks})

    def order(self) -> list[Task]:
        """The tasks in an order where every task comes after those it waits for."""
        return [self.task(name) for name in TopologicalSorter(self.graph()).static_order()]

    def settled(self, warn=lambda _m: None) -> dict[str, stage_contract.Settled]:
        """Tasks whose results the store already holds, verified: a task counts only once all it waits for do."""
        done: dict[str, stage_contract.Settled] = {}
        for task in self.order():
            if all(dep in done for dep in task.after):
                found = task.settle(warn)
                if found is not None:
                    done[task.name] = found
        return done


class _Where(NamedTuple):
    """The three config fields an output prefix is made of."""

    store: str
    run_id: str
    cell: str


def claude_tasks(plan: Plan) -> list[str]:
    """Tasks that call a Claude judge: their config's ``judge`` is a ``kind: anthropic`` judge spec (an analysis
    that only names the judges in its report calls none)."""
    return [t.name for t in plan.tasks
            if isinstance(t.config.get("judge"), dict) and t.config["judge"].get("kind") == "anthropic"]


def missing_key_warning(plan: Plan, environ: dict[str, str]) -> str | None:
    """Said at plan time, not hours later when the first judge task fails: which tasks need ANTHROPIC_API_KEY."""
    if environ.get("ANTHROPIC_API_KEY", "").strip():
        return None
    needing = claude_tasks(plan)
    if not needing:
        return None
    more = f", +{len(needing) - 3} more" if len(needing) > 3 else ""
    return (f"ANTHROPIC_API_KEY is not set: {len(needing)} judge task(s) use a Claude judge and will fail unless "
            f"their results are cached ({', '.join(needing[:3])}{more})")


class PlanBuilder:
    """Helps workflow modules build tasks with the common config fields filled in, and their edges from the data.

    ``add`` makes a task wait for every earlier task whose output its config names (see the module docstring);
    ``order_after=[(task, "why")]`` adds an edge that no data carries, and only with its reason.
    """

    def __init__(self, workflow: str, profile: str, run_id: str, store_root: str, seed: int = 42):
        self.workflow, self.profile, self.run_id = workflow, profile, run_id
        self.store = store.normalize_root(store_root)
        self.seed = seed
        self.tasks: list[Task] = []
        self._writers: dict[str, Task] = {}  # output prefix -> the task writing it

    def add(self, name: str, stage: str, cell: str, order_after: Sequence[tuple[Task, str]] = (), **config) -> Task:
        if "after" in config:
            raise ConfigError(f"plan {self.workflow}: task {name}: a bare after= is refused; a task waits for the "
                              "tasks whose outputs its config names, and for an ordering no data carries, with its "
                              "reason: order_after=[(task, 'why')]")
        full = {"store": self.store, "run_id": self.run_id, "cell": cell, "seed": self.seed, **config}
        read = self.data_edges(full)
        reasons = {}
        for entry in order_after:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], Task)
                    and isinstance(entry[1], str) and entry[1].strip()):
                raise ConfigError(f"plan {self.workflow}: task {name}: order_after takes (task, reason) pairs with a "
                                  f"reason, not {entry!r}")
            upstream, why = entry
            if upstream.name in read:
                raise ConfigError(f"plan {self.workflow}: task {name} reads the output of {upstream.name}, which "
                                  "already makes it wait: drop it from order_after")
            reasons[upstream.name] = why.strip()
        position = {t.name: i for i, t in enumerate(self.tasks)}
        after = sorted(read | set(reasons), key=lambda n: position.get(n, len(position)))
        task = Task(name=name, stage=stage, config=full, after=after, order_reasons=reasons)
        self.tasks.append(task)
        self._writers.setdefault(self.prefix_of(full, stage), task)
        return task

    def prefix_of(self, config: dict[str, Any], stage: str) -> str:
        """Where a task of this config writes (``Task.output_prefix`` without parsing the whole config)."""
        return stage_contract.output_prefix(_Where(config["store"], config["run_id"], config["cell"]), stage)

    def data_edges(self, config: dict[str, Any]) -> set[str]:
        """The earlier tasks whose outputs ``config`` names: a URI at or under one's output prefix (the most
        specific prefix, should one task's folder lie inside another's)."""
        found = set()
        for value in config_strings(config):
            uri = named_uri(value)
            if not uri.startswith(self.store):
                continue
            writer = self._writer_of(uri)
            if writer is not None:
                found.add(writer.name)
        return found

    def _writer_of(self, uri: str) -> Task | None:
        """The task whose output prefix ``uri`` is, or lies under on a path boundary (``.../gen-1/x`` is not under
        ``.../gen-10``): the longest such prefix."""
        path = uri.rstrip("/")
        while path:
            if path in self._writers:
                return self._writers[path]
            cut = path.rfind("/")
            if cut <= 0:
                return None
            path = path[:cut]
        return None

    def plan(self, params: dict[str, Any]) -> Plan:
        return Plan(
            workflow=self.workflow, profile=self.profile, run_id=self.run_id, store=self.store,
            tasks=self.tasks, params=params,
        )
