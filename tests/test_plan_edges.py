"""Plan edges come from the data a task reads: a task waits for the tasks whose outputs its config names, and for
nothing else unless a stated reason says why (``PlanBuilder.add(..., order_after=[(task, "why")])``)."""

from __future__ import annotations

import argparse

import pytest
import yaml

from shared.core import store
from shared.core.config import ConfigError
from workflows import WORKFLOWS
from workflows.__main__ import build_plan
from workflows.engines import argo
from workflows.engines.argo import ClusterSettings
from workflows.plan import Plan, PlanBuilder, config_strings, named_uri

QUESTIONS = [{"id": "q1", "text": "Hello there?"}]


def compiled(workflow: str, profile: str, root) -> Plan:
    """The plan ``python -m workflows run WORKFLOW --profile PROFILE`` would run, on a store of its own."""
    args = argparse.Namespace(command="run", workflow=workflow, profile=profile, set=[], params=None,
                              store=store.from_path(root), run_id=None)
    return build_plan(args)


def reads(task, prefix: str) -> bool:
    """Whether ``task``'s config names something at or under ``prefix`` (on a path boundary), at any depth."""
    return any(uri == prefix or uri.startswith(prefix + "/") for uri in map(named_uri, config_strings(task.config)))


@pytest.mark.parametrize("profile", ["tiny", "small"])
@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_every_edge_is_data_the_task_reads_or_has_a_stated_reason(tmp_path, workflow, profile):
    plan = compiled(workflow, profile, tmp_path / "store")
    prefixes = {t.name: t.output_prefix() for t in plan.tasks}
    edges = 0
    for task in plan.tasks:
        for upstream in task.after:
            edges += 1
            borne = reads(task, prefixes[upstream])
            assert borne or task.order_reasons.get(upstream, "").strip(), (
                f"{task.name} waits for {upstream} with neither data nor a reason")
            assert not (borne and upstream in task.order_reasons), f"{task.name}: a reason for a data edge"
        # and the converse: whatever another task writes and this one reads, it waits for
        unread = [n for n, p in prefixes.items() if n != task.name and n not in task.after and reads(task, p)]
        assert not unread, f"{task.name} reads the output of {unread} without waiting for it"
    assert edges > 0


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_both_engines_see_the_same_edges(tmp_path, workflow):
    """The local engine reads ``task.after``; the Argo compiler makes its dependencies of the same list."""
    plan = compiled(workflow, "tiny", tmp_path / "store")
    wf = yaml.safe_load(argo.to_yaml(plan, cluster=ClusterSettings(image_registry="registry.invalid/lab",
                                                                   git_sha="0" * 40)))
    entry = next(t for t in wf["spec"]["templates"] if t["name"] == wf["spec"]["entrypoint"])
    dag = {t["name"]: sorted(t.get("dependencies") or []) for t in entry["dag"]["tasks"]}
    assert dag == {t.name: sorted(t.after) for t in plan.tasks}


@pytest.fixture
def builder(tmp_path):
    return PlanBuilder("issue164", "tiny", "edges", store.from_path(tmp_path / "store"))


def gen(builder, name, **extra):
    return builder.add(name, "generate", name, **{"condition": name, "model_ref": "tiny:qwen2", "questions": QUESTIONS,
                                                  "n": 1, "max_new_tokens": 4, "backend": "hf", **extra})


def score(builder, name, **config):
    return builder.add(name, "score_classifier", name, **{
        "classifier_uri": store.join(builder.store, "c.joblib"),
        "completions_uri": store.join(builder.store, "c.jsonl"), **config})


def test_an_output_uri_in_the_config_adds_the_edge_at_any_depth(builder):
    first, second, model = gen(builder, "gen-1"), gen(builder, "gen-2"), gen(builder, "gen-3")
    plain = score(builder, "score-plain", completions_uri=first.output_uri("completions.jsonl"))
    assert plain.after == ["gen-1"] and plain.order_reasons == {}
    # an ``artifact:`` model reference
    served = gen(builder, "gen-served", model_ref=f"artifact:{model.output_uri('model')}")
    assert served.after == ["gen-3"]
    # in lists, and (the edge does not need a valid config) in dicts inside lists
    lists = builder.add("train", "train_classifier", "classifier", positive_uris=[first.output_uri("completions.jsonl")],
                        negative_uris=[second.output_uri("completions.jsonl")])
    assert lists.after == ["gen-1", "gen-2"]  # in build order
    deep = builder.add("deep", "judge", "deep", cells=[{"x": {"uris": [model.output_prefix()]}}, {"y": lists.output_uri()}])
    assert deep.after == ["gen-3", "train"]


def test_a_look_alike_prefix_adds_no_edge(builder):
    one, ten = gen(builder, "gen-1"), gen(builder, "gen-10")
    # the string ``.../gen-1/generate`` begins ``.../gen-1/generate-old/...``: not the same folder
    task = score(builder, "score-10", completions_uri=ten.output_uri("completions.jsonl"),
                 classifier_uri=one.output_prefix() + "-old/c.joblib")
    assert task.after == ["gen-10"]
    # the real case: in one cell, the judge stage's folder ``.../x/judge`` begins ``.../x/judge_check``
    judge = builder.add("judge-x", "judge", "x", completions_uri=one.output_uri("completions.jsonl"),
                        judge={"kind": "local", "model": "tiny:qwen2"}, judge_name="j")
    check = builder.add("judge-check-x", "judge_check", "x", judge={"kind": "local", "model": "tiny:qwen2"},
                        judge_name="j")
    assert check.output_prefix().startswith(judge.output_prefix())
    reader = score(builder, "score-check", classifier_uri=check.output_uri("check.json"))
    assert reader.after == ["judge-check-x"]
    # a store file that no task writes adds nothing
    assert score(builder, "score-none").after == []


def test_a_bare_after_is_refused(builder):
    first = gen(builder, "gen-1")
    with pytest.raises(ConfigError, match="bare after= is refused.*order_after"):
        score(builder, "score", after=[first])
    with pytest.raises(ConfigError, match=r"\(task, reason\) pairs"):
        score(builder, "score", order_after=[first])
    with pytest.raises(ConfigError, match=r"\(task, reason\) pairs"):
        score(builder, "score", order_after=[(first, "  ")])


def test_an_ordering_no_data_carries_needs_its_reason_and_keeps_it(builder):
    first = gen(builder, "gen-1")
    task = score(builder, "score", order_after=[(first, "one GPU: the generations run one at a time")])
    assert task.after == ["gen-1"]
    assert task.order_reasons == {"gen-1": "one GPU: the generations run one at a time"}
    assert builder.plan({}).graph() == {"gen-1": set(), "score": {"gen-1"}}


def test_a_reason_for_an_edge_the_data_already_carries_is_refused(builder):
    first = gen(builder, "gen-1")
    with pytest.raises(ConfigError, match="already makes it wait"):
        score(builder, "score", completions_uri=first.output_uri("completions.jsonl"), order_after=[(first, "why")])
