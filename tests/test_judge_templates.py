"""Judge templates as data a user may replace: a path instead of a shipped name, its content hash pinned in the
spec, and every cache (judgements, stage results) keyed by that content rather than by the name or path."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.judge import JudgeConfigError, JudgeItem, JudgeSpec, load_template, make_judge

SHIPPED = resources.files("shared").joinpath("data", "judges")


def own_copy(folder: Path, of: str = "coherence_v1", stem: str = "coherence_mine") -> Path:
    """The three files of a shipped template copied under another stem, as a user starting their own would."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("system.txt", "user.txt", "parse.json"):
        shutil.copyfile(SHIPPED.joinpath(f"{of}.{part}"), folder / f"{stem}.{part}")
    return folder / stem


def test_a_template_at_a_path_loads_like_a_shipped_one_and_hashes_the_same_bytes(tmp_path):
    stem = own_copy(tmp_path / "judges")
    mine, shipped = load_template(str(stem)), load_template("coherence_v1")
    assert (mine.name, mine.source) == ("coherence_mine", str(stem)) and shipped.source == "shipped"
    assert (mine.system, mine.user, mine.parse_rule, mine.sha256) == (
        shipped.system, shipped.user, shipped.parse_rule, shipped.sha256)
    assert load_template(f"{stem}.system.txt").sha256 == mine.sha256  # naming one of its files names it too


def test_an_edit_to_any_of_the_three_files_changes_the_hash(tmp_path):
    stem = own_copy(tmp_path)
    before = load_template(str(stem)).sha256
    for part, edit in (("system.txt", "\nBe strict."), ("user.txt", "\n"), ("parse.json", " ")):
        with open(f"{stem}.{part}", "a") as fh:
            fh.write(edit)
        after = load_template(str(stem)).sha256
        assert after != before
        before = after


def test_a_relative_path_is_made_absolute_so_a_stage_in_another_folder_reads_the_same_files(tmp_path, monkeypatch):
    own_copy(tmp_path / "judges")
    monkeypatch.chdir(tmp_path)
    spec = JudgeSpec(kind="local", model="tiny:qwen2", template="judges/coherence_mine")
    assert spec.template == str(tmp_path / "judges" / "coherence_mine")
    monkeypatch.chdir("/")
    assert make_judge(spec).template.name == "coherence_mine"


def test_a_missing_or_malformed_template_is_one_readable_line(tmp_path):
    with pytest.raises(JudgeConfigError, match=r"missing coherence_x\.system\.txt.*stem of three files"):
        load_template(str(tmp_path / "coherence_x"))
    stem = own_copy(tmp_path)
    Path(f"{stem}.user.txt").write_text("Question: {question}")
    with pytest.raises(ValidationError, match=r"user.txt must contain \{answer\} exactly once"):
        JudgeSpec(kind="local", model="tiny:qwen2", template=str(stem))


def test_a_spec_pins_its_templates_hash_and_refuses_a_template_edited_since(tmp_path):
    stem = own_copy(tmp_path)
    spec = JudgeSpec(kind="anthropic", model="claude-x", template=str(stem))
    assert spec.template_sha256 == load_template(str(stem)).sha256
    assert JudgeSpec.model_validate(spec.model_dump()) == spec  # a stage reading its config back gets the same spec
    Path(f"{stem}.system.txt").write_text("Grade coherence from 0 to 100.")
    with pytest.raises(ValidationError, match="has changed since this spec was made"):
        JudgeSpec.model_validate(spec.model_dump())
    with pytest.raises(JudgeConfigError, match="changed after its spec was made"):
        make_judge(spec)
    assert spec.with_template(str(stem)).template_sha256 == load_template(str(stem)).sha256


def test_judgements_are_cached_by_the_templates_content(tmp_path):
    stem = own_copy(tmp_path)
    spec = JudgeSpec(kind="anthropic", model="claude-x", template=str(stem))
    item = JudgeItem(id="a", question="q", answer="a")
    before = make_judge(spec).key_for(item)
    Path(f"{stem}.system.txt").write_text("Grade coherence from 0 to 100.")
    assert make_judge(spec.with_template(str(stem))).key_for(item) != before
    # the same bytes under the same stem in another folder: the same judgements (the key is content, not place)
    elsewhere = own_copy(tmp_path / "elsewhere", stem="coherence_mine")
    Path(f"{elsewhere}.system.txt").write_text("Grade coherence from 0 to 100.")
    assert make_judge(spec.with_template(str(elsewhere))).key_for(item) == make_judge(
        spec.with_template(str(stem))).key_for(item)


@pytest.mark.parametrize("stage", ["judge", "judge_check"])
def test_a_judge_stages_result_is_keyed_by_the_templates_content_not_its_path(tmp_path, stage):
    from jobs import judge, judge_check
    from shared.contract.stage import cache_key
    from shared.core import store

    module = {"judge": judge, "judge_check": judge_check}[stage]
    stem = own_copy(tmp_path)
    root = store.from_path(tmp_path / "store")
    fields = {"store": root, "run_id": "r", "cell": "c", "judge_name": "mine"}
    if stage == "judge":
        fields["completions_uri"] = store.join(root, "runs", "r", "gen", "completions.jsonl")

    def key() -> str:
        spec = JudgeSpec(kind="local", model="tiny:qwen2", template=str(stem))
        config = module.SPEC.config.model_validate({**fields, "judge": spec.model_dump()})
        return cache_key(module.SPEC, config, {})

    before = key()
    assert key() == before
    Path(f"{stem}.system.txt").write_text("Grade coherence from 0 to 100.")
    assert key() != before


def test_judge_check_items_are_keyed_by_their_content_too(tmp_path):
    from jobs import judge_check
    from shared.core import store

    items = tmp_path / "items.jsonl"
    shutil.copyfile(SHIPPED.joinpath("alignment_check_v1.jsonl"), items)
    fields = {"store": store.from_path(tmp_path / "store"), "run_id": "r", "cell": "c", "judge_name": "j",
              "judge": {"kind": "local", "model": "tiny:qwen2"}, "items_file": str(items)}
    config = judge_check.Config.model_validate(fields)
    assert config.items_sha256 == judge_check.items_sha256(str(items))
    with open(items, "a") as fh:
        fh.write(items.read_text().splitlines()[0].replace('"wish-aligned"', '"wish-aligned-2"') + "\n")
    with pytest.raises(ValidationError, match="changed since the plan was built"):
        judge_check.Config.model_validate(config.model_dump())
    assert judge_check.Config.model_validate(fields).items_sha256 != config.items_sha256
