"""Parameters you can find: ``python -m workflows params``, the nearest names for a mistyped ``--set`` key, and
``make help``."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

import workflows
from shared.core.config import ReplicatedParams
from workflows.params import check_known, listing, missing_descriptions, parameters

ROOT = Path(__file__).resolve().parent.parent


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from workflows.__main__ import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("workflow", workflows.WORKFLOWS)
@pytest.mark.parametrize("profile", ["tiny", "small", "full"])
def test_params_lists_every_parameter_with_its_value_in_the_profile(workflow, profile, capsys):
    module = workflows.load(workflow)
    code, out, err = cli(["params", workflow, "--profile", profile], capsys)
    assert code == 0, err
    listed = [line.split()[0] for line in out.splitlines()[2:] if line.startswith("  ")]
    assert listed == list(module.Params.model_fields)
    code, out, err = cli(["params", workflow, "--profile", profile, "--json"], capsys)
    values = {p["name"]: p["value"] for p in json.loads(out)}
    expected = module.Params.for_profile(profile).model_dump(mode="json")
    assert values == expected


def test_a_parameter_shows_its_description_and_whether_the_profile_set_it():
    class Params(ReplicatedParams):
        PROFILES = {"tiny": {"replicates": 3}, "small": {}, "full": {}}

    rows = {p.name: p for p in parameters(Params, "tiny")}
    assert rows["replicates"].value == 3 and rows["replicates"].changed_by_profile
    assert rows["seed"].value == 42 and not rows["seed"].changed_by_profile
    text = listing("demo", "tiny", list(rows.values()))
    line = next(t for t in text.splitlines() if t.strip().startswith("replicates"))
    assert re.match(r"^  replicates  \* 3 +training seeds per training cell, counting up from seed$", line)
    assert missing_descriptions(Params) == []  # the shared base fields are described


def test_an_unknown_set_key_names_the_nearest_parameters(capsys):
    code, out, err = cli(["run", "issue170", "--profile", "tiny", "--set", "soft_step=3", "--store", "/nonexistent"],
                         capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "unknown parameter 'soft_step' of issue170: did you mean soft_steps" in err
    module = workflows.load("issue164")
    with pytest.raises(Exception, match="did you mean n_completions"):
        check_known("issue164", module.Params, {"n_completion": 5})
    with pytest.raises(Exception, match="no parameter has a similar name"):
        check_known("issue164", module.Params, {"zzzz": 5})
    check_known("issue164", module.Params, {"n_completions": 5})  # a known key passes


UNDESCRIBED = {w: missing_descriptions(workflows.load(w).Params) for w in workflows.WORKFLOWS}


def test_every_parameter_of_every_workflow_has_a_description():
    assert {w: m for w, m in UNDESCRIBED.items() if m} == {}


def test_make_help_lists_every_target():
    makefile = (ROOT / "Makefile").read_text()
    targets = {m for m in re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M)}
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert targets and targets <= listed, f"targets missing from make help: {sorted(targets - listed)}"
    assert {"compare", "help", "submit", "workflow-yaml"} <= targets
