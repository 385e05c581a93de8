"""The stage contract: manifest last, a verified cache across runs, staging, leases, one readable line for bad input."""

from __future__ import annotations

import json

import pytest

from shared.contract.stage import MANIFEST, StageInputError, StageSpec, execute, run_stage
from shared.core import store
from shared.core.config import StageConfig

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
    if cfg.factor == 13:  # an unlucky factor: the stage writes part of its output, then fails
        raise RuntimeError("crashed halfway")
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
    store.write_json(uri, {**config, "factor": 3})
    assert run_stage(SPEC, ["--config", uri]) == 0
    assert calls == ["c1", "c1"]


def test_stage_on_s3_store(s3_bucket):
    numbers = store.join(s3_bucket, "inputs", "n.json")
    store.write_json(numbers, [4])
    calls.clear()
    cfg = {"store": s3_bucket, "run_id": "r", "cell": "s3cell", "numbers_uri": numbers}
    manifest = execute(SPEC, cfg)
    assert manifest["metrics"] == {"total": 8}
    execute(SPEC, cfg)
    assert calls == ["s3cell"]


# ---------------------------------------------------------------------------------------------------------------
# the cache across runs


def prefix_of(config, run_id=None, cell=None):
    return store.join(config["store"], "runs", run_id or config["run_id"], cell or config["cell"], "double")


def test_manifest_records_the_code_fingerprint_commit_dirty_flag_and_cache_key(config):
    manifest = execute(SPEC, config)
    assert manifest["code_fingerprint"] == SPEC.fingerprint and len(manifest["cache_key"]) == 64
    assert manifest["git_dirty"] in (True, False, None) and "git_commit" in manifest
    assert manifest["prefix"] == prefix_of(config)


def test_a_new_run_id_reuses_the_result_by_hard_link_and_says_so(config):
    first = execute(SPEC, config)
    again = execute(SPEC, {**config, "run_id": "r2", "cell": "other-cell"})
    assert calls == ["c1"]  # run id and cell are not part of the work
    assert again["reused_from"]["run_id"] == "r1" and again["reused_from"]["mode"] == "link"
    assert again["cache_key"] == first["cache_key"] and again["prefix"] == prefix_of(config, "r2", "other-cell")
    out = store.join(prefix_of(config, "r2", "other-cell"), "doubled.json")
    assert again["outputs"] == {out: store.sha256(out)} and store.read_json(out) == [2, 4, 6]
    assert execute(SPEC, {**config, "run_id": "r2", "cell": "other-cell"}).get("reused_from")  # now cached there


def test_the_same_input_content_under_another_uri_is_the_same_work(config):
    execute(SPEC, config)
    copy = store.join(config["store"], "elsewhere", "numbers.json")
    store.write_json(copy, [1, 2, 3])
    execute(SPEC, {**config, "run_id": "r2", "numbers_uri": copy})
    assert calls == ["c1"]


def test_changed_code_recomputes(config, monkeypatch):
    execute(SPEC, config)
    monkeypatch.setattr(StageSpec, "fingerprint", property(lambda self: "edited-code"))
    manifest = execute(SPEC, config)
    assert calls == ["c1", "c1"] and manifest["code_fingerprint"] == "edited-code"


def test_an_output_edited_after_its_manifest_is_one_warning_and_a_recompute(config, capsys):
    execute(SPEC, config)
    out = store.join(prefix_of(config), "doubled.json")
    store.write_json(out, [2, 4])  # cut short
    execute(SPEC, config)
    err = capsys.readouterr().err
    assert calls == ["c1", "c1"] and store.read_json(out) == [2, 4, 6]
    assert [ln for ln in err.splitlines() if ln.startswith("warning:")] == [
        next(ln for ln in err.splitlines() if "no longer matches its manifest" in ln)]


def test_a_corrupt_source_is_not_reused_by_another_run(config, capsys):
    execute(SPEC, config)
    out = store.join(prefix_of(config), "doubled.json")
    (tmp := store._local(out)).unlink()
    tmp.write_text("[0]\n")
    manifest = execute(SPEC, {**config, "run_id": "r2"})
    assert calls == ["c1", "c1"] and "reused_from" not in manifest
    assert "not reused" in capsys.readouterr().err


@pytest.mark.parametrize("garbage", [bytes(range(256)) * 4, b"[1, 2]", b'{"status": "complete"}'])
def test_a_corrupt_manifest_is_a_warning_and_a_recompute_never_a_crash(config, garbage, capsys):
    execute(SPEC, config)
    store.write_bytes(store.join(prefix_of(config), MANIFEST), garbage)
    assert run_stage(SPEC, ["--config", json.dumps(config)]) == 0
    assert calls == ["c1", "c1"]
    assert "warning:" in capsys.readouterr().err
    assert store.read_json(store.join(prefix_of(config), MANIFEST))["status"] == "complete"


def test_a_failing_rerun_leaves_the_previous_result_intact(config, capsys):
    before = execute(SPEC, config)
    out = store.join(prefix_of(config), "doubled.json")
    assert run_stage(SPEC, ["--config", json.dumps({**config, "factor": 13})]) == 1  # writes, then crashes
    assert "crashed halfway" in capsys.readouterr().err
    assert store.read_json(store.join(prefix_of(config), MANIFEST)) == before
    assert store.read_json(out) == [2, 4, 6]  # the partial [13, 26, 39] stayed in staging


def test_a_kill_before_the_new_manifest_is_in_place_leaves_the_previous_result_valid(config, monkeypatch):
    from shared.contract import stage

    first = execute(SPEC, config)
    folder = prefix_of(config)
    before = store.read_bytes(store.join(folder, "doubled.json"))

    def killed_at_the_swap(new, target):
        raise KeyboardInterrupt("killed")  # the new outputs and manifest are staged, not yet in place

    monkeypatch.setattr(stage.store, "replace_folder", killed_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        execute(SPEC, {**config, "factor": 3})  # other work, same output folder
    monkeypatch.undo()
    assert store.read_bytes(store.join(folder, "doubled.json")) == before
    assert execute(SPEC, config)["cache_key"] == first["cache_key"]
    assert calls == ["c1", "c1"]  # the old result was served from the cache, not recomputed
    execute(SPEC, {**config, "factor": 3})
    assert calls == ["c1", "c1", "c1"] and json.loads(store.read_bytes(store.join(folder, "doubled.json"))) != \
        json.loads(before)


def test_the_swap_is_one_step_old_folder_or_new_folder_never_a_mix(tmp_path):
    old, new = tmp_path / "out", tmp_path / "staged"
    old.mkdir()
    (old / "a.json").write_text("old a")
    (old / "stale.json").write_text("only in the old result")
    new.mkdir()
    (new / "a.json").write_text("new a")
    store.replace_folder(store.from_path(new), store.from_path(old))
    assert sorted(p.name for p in old.iterdir()) == ["a.json"] and (old / "a.json").read_text() == "new a"
    assert not new.exists() and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_moved_store_folder_is_still_cached(config, tmp_path):
    import shutil

    execute(SPEC, config)
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "store", moved)
    root = store.from_path(moved)
    manifest = execute(SPEC, {**config, "store": root, "numbers_uri": store.join(root, "inputs", "numbers.json")})
    assert calls == ["c1"] and manifest["prefix"].startswith(root)


def test_the_log_is_copied_to_the_store(config):
    assert run_stage(SPEC, ["--config", json.dumps(config)]) == 0
    [log] = store.list_uris(store.join(config["store"], "runs", "r1", "_logs", "c1", "double"))
    assert "starting (key" in store.read_text(log)


# ---------------------------------------------------------------------------------------------------------------
# one writer per stage


def test_a_second_writer_waits_for_the_lease_then_finds_the_work_done(config, monkeypatch):
    import threading

    from shared.contract import stage
    from shared.contract.lease import Lease
    from shared.core.config import parse

    cfg = parse(DoubleConfig, config)
    holder = Lease(stage.lease_uri(cfg, "double"), what="the first run")
    assert holder.try_acquire()
    waited = threading.Event()
    monkeypatch.setattr(stage.Context, "log", lambda self, message: waited.set() if "waiting" in message else None)
    worker = threading.Thread(target=execute, args=(SPEC, config))
    worker.start()
    assert waited.wait(10)
    assert calls == []  # nothing written while the lease is held
    holder.release()
    worker.join(30)
    assert calls == ["c1"]


def test_a_lease_of_a_dead_process_on_this_host_is_taken_at_once(config):
    import socket
    import time

    from shared.contract import stage
    from shared.core.config import parse

    cfg = parse(DoubleConfig, config)
    dead = {"owner": "x", "host": socket.gethostname(), "pid": 2**22 + 17, "expires_at": time.time() + 3600}
    store.write_json(stage.lease_uri(cfg, "double"), dead)
    execute(SPEC, config)
    assert calls == ["c1"]
    assert not store.exists(stage.lease_uri(cfg, "double"))  # released after the work


def test_reuse_on_s3_checks_s3_checksums_without_downloading(s3_bucket, monkeypatch):
    numbers = store.join(s3_bucket, "inputs", "n.json")
    store.write_json(numbers, [4])
    calls.clear()
    cfg = {"store": s3_bucket, "run_id": "r", "cell": "c", "numbers_uri": numbers}
    first = execute(SPEC, cfg)
    assert first["output_checksums"]  # S3 computed a SHA-256 of every output at upload
    real_read_bytes = store.read_bytes

    def no_output_downloads(uri):
        assert not uri.endswith("doubled.json"), f"downloaded {uri}"
        return real_read_bytes(uri)

    monkeypatch.setattr(store, "read_bytes", no_output_downloads)
    again = execute(SPEC, {**cfg, "run_id": "r2"})  # verified by checksums, copied server-side
    execute(SPEC, {**cfg, "run_id": "r2"})  # cached: verified by checksums again
    assert again["reused_from"]["mode"] == "copy" and calls == ["c"]
    monkeypatch.setattr(store, "read_bytes", real_read_bytes)

    out = store.join(s3_bucket, "runs", "r2", "c", "double", "doubled.json")
    bucket, key = out[len("s3://"):].split("/", 1)
    store.s3_client().put_object(Bucket=bucket, Key=key, Body=b"[0]\n")  # edited by another tool, no SHA-256
    assert not store.verify(out, again["outputs"][out], again["output_checksums"].get(out))
    fixed = execute(SPEC, {**cfg, "run_id": "r2"})  # not cached: brought again from run r, verified
    assert fixed["reused_from"]["run_id"] == "r" and store.read_json(out) == [8] and calls == ["c"]


# ---------------------------------------------------------------------------------------------------------------
# the code fingerprint


def test_a_stage_fingerprint_covers_the_modules_it_imports_and_the_data_it_names():
    from shared.contract import fingerprint

    judge = fingerprint.closure("jobs.judge")
    assert {"jobs.judge", "shared.judge.local", "shared.judge.cache", "shared.contract.stage"} <= set(judge)
    assert "jobs.generate" not in judge and "shared.analysis.stats" not in judge
    assert any(name.startswith("data:judges/") for name in fingerprint.fingerprinted_files("jobs.judge"))
    assert not any(name.startswith("data:") for name in fingerprint.fingerprinted_files("jobs.generate"))


def test_a_stage_that_is_a_package_is_fingerprinted_by_every_module_of_it(tmp_path):
    from tests.fakes.project_tree import fingerprint_in, write_tree

    write_tree(tmp_path, {
        "jobs/analysis/__init__.py": "from jobs.analysis.stage import SPEC\n",
        "jobs/analysis/stage.py": "from jobs.analysis import figures\nSPEC = figures\n",
        "jobs/analysis/figures.py": "from jobs.analysis.results import x\n", "jobs/analysis/results.py": "x = 1\n",
        "jobs/analysis/__main__.py": "from jobs.analysis.stage import SPEC\n",  # imported by nothing
        "jobs/analysis/helpers/__init__.py": "", "jobs/analysis/helpers/text.py": "y = 2\n",
        "jobs/other.py": "z = 3\n",
    })
    before = fingerprint_in(tmp_path, "jobs.analysis")
    (tmp_path / "jobs" / "other.py").write_text("z = 4\n")
    assert fingerprint_in(tmp_path, "jobs.analysis") == before
    for name in ("figures.py", "results.py", "__main__.py", "helpers/text.py", "__init__.py"):
        path = tmp_path / "jobs" / "analysis" / name
        path.write_text(path.read_text() + "# edited\n")
        after = fingerprint_in(tmp_path, "jobs.analysis")
        assert after != before, name
        before = after


def test_every_file_of_an_analysis_package_is_in_its_stage_fingerprint():
    from jobs.registry import get
    from shared.contract import fingerprint

    for stage in ("analyze_issue164", "analyze_issue170", "analyze_issue205", "analyze_issue81"):
        files = fingerprint.fingerprinted_files(get(stage).module)
        package = {f"jobs.{stage}", *(f"jobs.{stage}.{part}" for part in (
            "__main__", "results", "decisions", "figures", "report", "stage"))}
        assert package <= set(files), stage


def test_editing_an_imported_module_changes_the_fingerprint_and_editing_another_does_not(tmp_path):
    from tests.fakes.project_tree import fingerprint_in, write_tree

    write_tree(tmp_path, {
        "jobs/stage.py": "from shared import helper\n\ndef run():\n    from shared.lazy import x\n    return 'things/a.txt'\n",
        "shared/helper.py": "VALUE = 1\n", "shared/lazy.py": "x = 2\n", "shared/unrelated.py": "y = 3\n",
        "shared/data/things/a.txt": "data\n",
    })

    def fingerprint() -> str:
        return fingerprint_in(tmp_path)

    before = fingerprint()
    assert fingerprint() == before  # stable
    (tmp_path / "shared" / "unrelated.py").write_text("y = 4\n")
    assert fingerprint() == before
    for name in ("shared/lazy.py", "shared/helper.py", "shared/data/things/a.txt"):
        (tmp_path / name).write_text((tmp_path / name).read_text() + "# edited\n")
        after = fingerprint()
        assert after != before, name
        before = after
