"""Bad input anywhere gives one readable error line, a non-zero exit and no manifest for the failed stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.core import store

REPO = Path(__file__).resolve().parents[1]


def run_stage(stage: str, config: dict, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"jobs.{stage}", "--config", json.dumps(config)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **env}, timeout=300,
    )


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def completions(tmp_path) -> tuple[str, str]:
    root = store.from_path(tmp_path / "store")
    uri = store.join(root, "inputs", "completions.jsonl")
    store.write_jsonl(uri, [{"condition": "c", "question_id": "q", "question": "Hi?", "sample": 0, "text": "Hello."}])
    return root, uri


def test_anthropic_judge_without_api_key(tmp_path):
    root, uri = completions(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.judge", "--config", json.dumps({
            "store": root, "run_id": "r", "cell": "c", "completions_uri": uri, "judge_name": "sonnet",
            "judge": {"kind": "anthropic", "model": "claude-sonnet-4-5-20250929"}})],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "ANTHROPIC_API_KEY" in error_lines(proc)[0]
    assert "Traceback" not in proc.stderr
    assert not store.exists(store.join(root, "runs", "r", "c", "judge", "manifest.json"))


def test_unreachable_s3_endpoint(tmp_path):
    proc = run_stage("judge", {
        "store": "s3://eps-bucket/root", "run_id": "r", "cell": "c", "judge_name": "local",
        "completions_uri": "s3://eps-bucket/root/inputs/completions.jsonl",
        "judge": {"kind": "local", "model": "tiny:qwen2"}},
        AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
        AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(error_lines(proc)) == 1 and "unreachable" in error_lines(proc)[0]
    assert "Traceback" not in proc.stderr


def test_a_bad_config_field(tmp_path):
    root, uri = completions(tmp_path)
    proc = run_stage("generate", {"store": root, "run_id": "r", "cell": "c", "condition": "c",
                                  "model_ref": "tiny:qwen2", "questions": [], "n": "several"})
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1 and "n:" in error_lines(proc)[0]
    assert not store.list_uris(store.join(root, "runs"))


def test_an_unknown_workflow_and_profile_from_make():
    for args, message in ((["WORKFLOW=issue999"], "unknown workflow"), (["PROFILE=huge"], "unknown profile")):
        # ARGS is emptied and MAKEFLAGS dropped so that a caller's `make test ARGS=...` cannot leak in
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")}
        proc = subprocess.run(["make", "-s", "run", *args, "ARGS="], capture_output=True, text=True, cwd=REPO,
                              env=env, timeout=300)
        assert proc.returncode != 0
        assert message in proc.stderr


BAD_RUNS = [  # (what is given, the file it names with its content or None, a phrase of the error line)
    (["--set", "n_completions=-3"], None, "n_completions must be at least 1"),
    (["--set", "temperature=-1"], None, "temperature must be at least 0"),
    (["--set", "conditions_file={file}"], "", "is empty"),
    (["--set", "conditions_file={file}"], "[]", "holds no records"),
    (["--set", "conditions_file={file}"], '[{"name": "x"}]', "system: Field required"),
    (["--set", "panel_file={file}"], b"\xff\xfe", "not UTF-8"),
    (["--params", "{file}"], "{oops", "not valid JSON"),
    (["--params", "{file}"], "[1]", "expected a JSON object"),
    (["--store", "s3://"], None, "names no bucket"),
    (["--store", "{file}/store"], "a file, not a folder", "not writable"),
    (["--run-id", "../escape"], None, "bad run id"),
]


@pytest.mark.parametrize("args, content, message", BAD_RUNS)
def test_bad_parameters_files_and_stores_are_one_line_and_exit_2_before_anything_runs(
        args, content, message, tmp_path, monkeypatch, capsys):
    from workflows.__main__ import main

    monkeypatch.chdir(tmp_path)
    file = tmp_path / "given"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        file.write_text(content)
    args = [a.replace("{file}", str(file)) for a in args]
    store_args = [] if "--store" in args else ["--store", str(tmp_path / "store")]
    code = main(["run", "issue164", "--profile", "tiny", *store_args, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "store" / "runs").exists() and not (tmp_path / "s3:").exists()


OUT_OF_RANGE = [  # (workflow, the parameter set, a phrase of the error line)
    ("issue81", "coherence_threshold=150", "coherence_threshold: Input should be less than or equal to 100"),
    ("issue81", "headline_layer=-1", "headline_layer: Input should be greater than or equal to 0"),
    ("issue81", "checkpoint_every=-5", "checkpoint_every: Input should be greater than or equal to 0"),
    ("issue170", "gcg_search_width=0", "gcg_search_width: Input should be greater than 0"),
    ("issue170", "teacher_temperature=0", "teacher_temperature: Input should be greater than 0"),
    ("issue170", "eval_top_p=1.5", "eval_top_p: Input should be less than or equal to 1"),
    ("issue205", "expected_eval_personas=0", "expected_eval_personas: Input should be greater than 0"),
    ("issue205", "lda_components=0", "lda_components: Input should be greater than 0"),
    ("issue205", "n_splits=1", "n_splits: Input should be greater than or equal to 2"),
]


def assert_refused_before_anything_runs(workflow, setting, message, tmp_path, monkeypatch, capsys):
    """``--set setting`` on a tiny run: exit 2, one error line holding ``message``, nothing written to the store."""
    from workflows.__main__ import main

    monkeypatch.chdir(tmp_path)
    code = main(["run", workflow, "--profile", "tiny", "--store", str(tmp_path / "store"), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "store" / "runs").exists()


@pytest.mark.parametrize("workflow, setting, message", OUT_OF_RANGE)
def test_out_of_range_parameters_of_every_workflow_stop_before_anything_runs(
        workflow, setting, message, tmp_path, monkeypatch, capsys):
    assert_refused_before_anything_runs(workflow, setting, message, tmp_path, monkeypatch, capsys)


# ---------------------------------------------------------------------------------------------------------------
# unknown keys at every level: a typo cannot run a different experiment


def reachable_models(model: type, seen: set | None = None) -> set[type]:
    """Every pydantic model a field of ``model`` can hold, at any depth (lists, dicts, unions, optionals)."""
    import typing

    from pydantic import BaseModel

    seen = set() if seen is None else seen

    def visit(annotation) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.add(annotation)
                for field in annotation.model_fields.values():
                    visit(field.annotation)
        for arg in typing.get_args(annotation):
            visit(arg)

    visit(model)
    return seen


def test_the_walk_finds_nested_models_and_a_model_that_ignores_keys():
    from pydantic import BaseModel

    from shared.core.config import Strict

    class Loose(BaseModel):
        x: int = 0

    class Inner(Strict):
        loose: dict[str, list[Loose | None]] = {}

    class Outer(Strict):
        inner: Inner | None = None

    found = reachable_models(Outer)
    assert found == {Outer, Inner, Loose}
    assert [m for m in found if m.model_config.get("extra") != "forbid"] == [Loose]  # the check can fail


def every_workflow_params() -> list[type]:
    import workflows

    return [workflows.load(name).Params for name in workflows.WORKFLOWS]


@pytest.mark.parametrize("root", every_workflow_params(), ids=lambda m: m.__module__)
def test_every_model_reachable_from_a_workflows_params_forbids_unknown_keys(root):
    loose = sorted(f"{m.__module__}.{m.__name__}" for m in reachable_models(root)
                   if m.model_config.get("extra") != "forbid")
    assert loose == [], "unknown keys would be dropped silently"


NESTED_TYPOS = [  # (workflow, a parameter holding a typo one level down, a phrase of the error line)
    ("issue170", 'soft_cells=[{"name": "s0", "k": 4, "lr": 0.03, "init": "You are evil."}]', "init: Extra inputs"),
    ("issue170", 'gcg_cells=[{"name": "l4", "length": 4, "steps": 2, "slott": "user"}]', "slott: Extra inputs"),
    ("issue164", 'primary_judge={"name": "a", "spec": {"kind": "local", "model": "tiny:qwen2"}, "temprature": 0}',
     "temprature: Extra inputs"),
]


@pytest.mark.parametrize("workflow, setting, message", NESTED_TYPOS)
def test_a_nested_typo_is_one_error_line_and_exit_2(workflow, setting, message, tmp_path, monkeypatch, capsys):
    from workflows.__main__ import main

    monkeypatch.chdir(tmp_path)
    code = main(["run", workflow, "--profile", "tiny", "--store", str(tmp_path / "store"), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "store" / "runs").exists()


NOT_A_NUMBER = [  # (workflow, setting, a phrase of the error line): refused before anything runs
    ("issue164", "temperature=Infinity", "temperature must be a finite number"),
    ("issue164", "temperature=NaN", "temperature must be a finite number"),
    ("issue164", "seed=-1", "seed must be at least 0"),
]


@pytest.mark.parametrize("workflow, setting, message", NOT_A_NUMBER)
def test_non_finite_numbers_and_negative_seeds_stop_before_anything_runs(
        workflow, setting, message, tmp_path, monkeypatch, capsys):
    assert_refused_before_anything_runs(workflow, setting, message, tmp_path, monkeypatch, capsys)


def test_every_json_the_store_writes_is_strict_json(tmp_path):
    uri = store.join(store.from_path(tmp_path), "h.json")
    store.write_json(uri, {"p": float("nan"), "d": [1.0, float("inf"), -float("inf")], "ok": 0.5})
    text = store.read_text(uri)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(text, parse_constant=refuse) == {"p": None, "d": [1.0, None, None], "ok": 0.5}
    store.write_jsonl(uri, [{"x": float("nan")}])
    assert json.loads(store.read_text(uri), parse_constant=refuse) == {"x": None}


def test_a_missing_anthropic_key_is_named_at_plan_time_with_the_count_of_judge_tasks(tmp_path):
    import types

    from workflows.__main__ import build_plan
    from workflows.plan import claude_tasks, missing_key_warning

    claude = '{"name": "sonnet", "spec": {"kind": "anthropic", "model": "claude-sonnet-4-5-20250929"}}'
    args = types.SimpleNamespace(workflow="issue164", profile="tiny", set=[f"primary_judge={claude}"], params=None,
                                 store=str(tmp_path / "store"), run_id="r", command="run")
    plan = build_plan(args)
    needing = claude_tasks(plan)
    assert needing and all(name.startswith(("judge-", "judge-check-")) for name in needing)
    warning = missing_key_warning(plan, {})
    assert f"{len(needing)} judge task(s) use a Claude judge" in warning and "unless" in warning
    assert missing_key_warning(plan, {"ANTHROPIC_API_KEY": "set"}) is None  # silent where it must be
    local = build_plan(types.SimpleNamespace(**{**vars(args), "set": []}))
    assert claude_tasks(local) == [] and missing_key_warning(local, {}) is None


# ---------------------------------------------------------------------------------------------------------------
# records inside stage configs: a workflow keeps only the fields a stage uses, so an unknown key is an error there


def test_an_unknown_key_in_a_record_of_a_stage_config_is_refused_at_any_depth():
    from pydantic import BaseModel, ConfigDict

    from shared.core.config import ConfigError, StageConfig, parse

    class Question(BaseModel):
        id: str
        text: str

    class Cell(BaseModel):
        questions: list[Question] = []

    class Metadata(BaseModel):  # a model that tolerates extra keys, and says so
        model_config = ConfigDict(extra="ignore")
        source: str = ""

    class Config(StageConfig):
        question: Question | None = None
        by_name: dict[str, Cell] = {}
        metadata: Metadata = Metadata()

    base = {"store": "file:///s", "run_id": "r", "cell": "c"}
    for typo, where in (
        ({"question": {"id": "q", "txt": "Hi?", "text": "Hi?"}}, "question.txt"),
        ({"by_name": {"a": {"questions": [{"id": "q", "text": "Hi?"}, {"id": "r", "text": "Ho?", "tag": 1}]}}},
         "by_name.a.questions.1.tag"),
        ({"by_name": {"a": {"question": []}}}, "by_name.a.question"),
    ):
        with pytest.raises(ConfigError) as err:
            parse(Config, {**base, **typo}, "config")
        assert str(err.value) == f"bad config: {where}: Extra inputs are not permitted"
    fine = parse(Config, {**base, "question": {"id": "q", "text": "Hi?"}, "metadata": {"source": "x", "year": 2025},
                          "by_name": {"a": {"questions": [{"id": "q", "text": "Hi?"}]}}}, "config")
    assert fine.question.text == "Hi?" and fine.metadata.source == "x"  # declared tolerance is kept


def test_a_typo_in_a_question_record_of_a_real_stage_is_one_line_and_a_data_files_metadata_is_not(tmp_path):
    from jobs.generate import Config
    from shared.core.config import ConfigError, parse
    from shared.core.datafiles import read_questions

    base = {"store": store.from_path(tmp_path), "run_id": "r", "cell": "c", "condition": "c", "model_ref": "tiny:qwen2"}
    with pytest.raises(ConfigError, match=r"questions.0.txt: Extra inputs are not permitted"):
        parse(Config, {**base, "questions": [{"id": "q", "txt": "Hi?", "text": "Hi?"}]}, "config")
    panel = tmp_path / "panel.jsonl"
    panel.write_text("".join(json.dumps({"id": f"q{i}", "text": "Hi?", "category": "ethics", "source": "#104"}) + "\n"
                             for i in range(2)))
    questions = read_questions(str(panel))  # the reader keeps what a stage uses
    assert parse(Config, {**base, "questions": questions}, "config").questions[1].id == "q1"
