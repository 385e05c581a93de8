"""docs/architecture.md stays true: its worked example runs and builds the plan it describes, the shared packages
it lists are the ones there are with the imports their docstrings allow, and the project paths it names exist."""

from __future__ import annotations

import re

from tests.test_import_graph import ROOT, shared_packages

PAGE = ROOT / "docs" / "architecture.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_the_worked_example_builds_the_plan_the_page_describes(tmp_path, monkeypatch):
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)  # the example's store is the relative folder artifacts/
    namespace: dict = {"__name__": "architecture_page"}
    exec(compile(blocks[0], str(PAGE), "exec"), namespace)  # the block's own asserts run here
    plan = namespace["plan"]
    assert [(t.name, t.stage, t.after) for t in plan.tasks] == [("gen-base", "generate", []),
                                                                 ("judge-base", "judge", ["gen-base"])]
    judge = plan.task("judge-base").config
    assert judge["completions_uri"].endswith("/runs/toy/base/generate/completions.jsonl")
    assert plan.task("gen-base").config["model_ref"] == "tiny:qwen2"  # the tiny profile's value
    assert not (tmp_path / "artifacts").exists()  # building a plan writes nothing


def test_the_package_table_is_the_shared_packages_and_their_allowed_imports():
    rows = re.findall(r"^\| `shared/(\w+)/` \| .*? \| ([\w ,]+) \|$", PAGE.read_text(), re.M)
    table = {f"shared.{name}": {f"shared.{p.strip()}" for p in may.split(",")} - {"shared.nothing"}
             for name, may in rows}
    assert table == shared_packages(ROOT)


def test_every_project_path_the_page_names_exists():
    named = set(re.findall(r"`((?:shared|jobs|workflows|images|tests|docs)/[\w./-]*)`", PAGE.read_text()))
    assert named
    placeholders = {p for p in named if "NN" in p}  # workflows/issueNN.py: the one you write
    assert sorted(p for p in named - placeholders if not (ROOT / p).exists()) == []
