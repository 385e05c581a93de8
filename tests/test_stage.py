"""The stage contract: manifest last, skip when complete, one readable line for bad input."""

from __future__ import annotations

import json

import pytest

from shared import store
from shared.config import StageConfig
from shared.stage import MANIFEST, StageInputError, StageSpec, execute, run_stage

calls: list[str] = []


class DoubleConfig(StageConfig):
    numbers_uri: str
    factor: int = 2


def double(cfg: DoubleConfig, ctx) -> dict:
    calls.append(cfg.cell)
    rows = store.read_json(cfg.numbers_uri)
    if not rows:
        raise StageInputError(f"no numbers in {cfg.numbers_uri}")
    out = [x * cfg.factor for x in rows]
    store.write_json(ctx.out("doubled.json"), out)
    return {"total": sum(out)}


SPEC = StageSpec(name="double", config=DoubleConfig, run=double)


@pytest.fixture
def config(tmp_path):
    root = store.from_path(tmp_path / "store")
    numbers = store.join(root, "inputs", "numbers.json")
    store.write_json(numbers, [1, 2, 3])
    calls.clear()
    return {"store": root, "run_id": "r1", "cell": "c1", "numbers_uri": numbers}


def test_manifest_records_config_inputs_outputs_and_metrics(config):
    manifest = execute(SPEC, config)
    prefix = store.join(config["store"], "runs", "r1", "c1", "double")
    assert store.read_json(store.join(prefix, MANIFEST)) == manifest
    assert manifest["status"] == "complete"
    assert manifest["metrics"] == {"total": 12}
    assert manifest["inputs"] == {config["numbers_uri"]: store.sha256(config["numbers_uri"])}
    out = store.join(prefix, "doubled.json")
    assert manifest["outputs"] == {out: store.sha256(out)}
    assert manifest["config"]["factor"] == 2 and manifest["seed"] == 42
    for key in ("git_commit", "packages", "hardware", "wall_time_s", "image"):
        assert key in manifest


def test_second_run_with_same_config_and_inputs_is_skipped(config):
    execute(SPEC, config)
    execute(SPEC, config)
    assert calls == ["c1"]


def test_changed_config_or_input_runs_again(config):
    execute(SPEC, config)
    execute(SPEC, {**config, "factor": 3})
    store.write_json(config["numbers_uri"], [5])
    execute(SPEC, {**config, "factor": 3})
    assert len(calls) == 3
    out = store.join(config["store"], "runs", "r1", "c1", "double", "doubled.json")
    assert store.read_json(out) == [15]


def test_bad_field_exits_2_with_one_line_and_writes_no_manifest(config, tmp_path, capsys):
    code = run_stage(SPEC, ["--config", json.dumps({**config, "factor": "many"})])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "factor" in err
    assert not store.list_uris(store.join(config["store"], "runs"))


def test_unknown_field_is_rejected(config, capsys):
    assert run_stage(SPEC, ["--config", json.dumps({**config, "facter": 3})]) == 2
    assert "facter" in capsys.readouterr().err


def test_bad_input_after_success_keeps_what_was_stored(config, capsys):
    execute(SPEC, config)
    before = store.read_json(store.join(config["store"], "runs", "r1", "c1", "double", MANIFEST))
    empty = store.join(config["store"], "inputs", "empty.json")
    store.write_json(empty, [])
    code = run_stage(SPEC, ["--config", json.dumps({**config, "cell": "c2", "numbers_uri": empty})])
    assert code == 2 and "no numbers" in capsys.readouterr().err
    assert not store.exists(store.join(config["store"], "runs", "r1", "c2", "double", MANIFEST))
    assert store.read_json(store.join(config["store"], "runs", "r1", "c1", "double", MANIFEST)) == before


def test_missing_input_is_a_readable_error(config, capsys):
    missing = store.join(config["store"], "inputs", "nope.json")
    assert run_stage(SPEC, ["--config", json.dumps({**config, "numbers_uri": missing})]) == 2
    assert "numbers_uri not found" in capsys.readouterr().err


def test_config_may_be_a_file_or_a_store_uri(config, tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    assert run_stage(SPEC, ["--config", str(path)]) == 0
    uri = store.join(config["store"], "cfg.json")
    store.write_json(uri, {**config, "cell": "c3"})
    assert run_stage(SPEC, ["--config", uri]) == 0
    assert calls == ["c1", "c3"]


def test_stage_on_s3_store(s3_bucket):
    numbers = store.join(s3_bucket, "inputs", "n.json")
    store.write_json(numbers, [4])
    calls.clear()
    cfg = {"store": s3_bucket, "run_id": "r", "cell": "s3cell", "numbers_uri": numbers}
    manifest = execute(SPEC, cfg)
    assert manifest["metrics"] == {"total": 8}
    execute(SPEC, cfg)
    assert calls == ["s3cell"]
