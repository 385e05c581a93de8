"""Issue 22's bench end to end at toy shapes on the CPU (so the device calls cannot fail on a typo): every section
writes its measurements, the report merges them into the tables and the headline; and the CPU token counts are
the counts the student paths report."""

from __future__ import annotations

import json

import pytest
import torch

from bench import full_bench, full_report
from bench.student_tokens import counts, step_examples
from shared.lm import chat
from shared.lm.teacher import student_ce


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded 2-core machine: two intra-op threads wait on each other
    yield
    torch.set_num_threads(previous)


def test_every_section_runs_at_toy_shapes_and_the_report_gives_the_headline(tmp_path, monkeypatch, one_thread):
    # each code path once: a cache step, a packed step with grouped overlapped draws, the reference step
    small = dict(full_bench.SETTINGS["tiny"], reps=3, soft_cases=[
        ("record", "cache", 1, False), ("record", "packed", 2, True), ("fixed", "current", 1, False)],
        sampling_cases=[("teacher", "record", "fast"), ("eval", "fixed", "fast"), ("teacher", "fixed", "fast"),
                        ("teacher", "fixed", "generate")])
    monkeypatch.setitem(full_bench.SETTINGS, "tiny", small)
    assert full_bench.main(["--out", str(tmp_path), "--shape", "tiny"]) == 0
    sections = sorted(str(p) for p in tmp_path.glob("full_bench_*.json"))
    assert len(sections) == len(full_bench.SECTIONS)
    for path in sections:
        errors = {k: v["error"] for k, v in json.loads(open(path).read()).items() if isinstance(v, dict) and "error" in v}
        assert not errors, errors
    assert full_report.main([*sections, "--results", str(tmp_path / "results")]) == 0
    head = json.loads((tmp_path / "results" / "cpu_headline.json").read_text())
    for name in full_bench.BARS:
        assert head[name] > 0 and len(head["details"][name]["runs"]) == 3
    assert "record_packed_draw2_overlap" in head["details"]["soft_step_s"]["config"] or \
        "record_cache_draw1" in head["details"]["soft_step_s"]["config"]
    gcg = json.loads(open(tmp_path / "full_bench_gcg.json").read())["gcg"]
    assert gcg["full_s"]["median"] > gcg["screened_s"]["median"]  # the record's work scores more rows
    assert (tmp_path / "results" / "cpu_full_bench.md").read_text().count("\n| ") > 10


@pytest.mark.parametrize("regime", ["fixed", "record"])
def test_the_cpu_token_counts_are_what_the_student_paths_run(regime, one_thread):
    from bench.full_bench import build_model

    model, tokenizer = build_model("tiny", "cpu")
    examples = step_examples(tokenizer, regime, k=4, n_questions=3, completions=3, new_tokens=12)
    pad = chat.soft_placeholder_id(tokenizer)
    for path in ("current", "cache", "packed"):
        with torch.no_grad():
            ran = student_ce(model, examples, pad, None, max_tokens=80, shared_prompt=path != "current",
                             pack_replies=path == "packed")
        counted = counts(examples, path, 80)
        assert ran.tokens == counted["tokens"]
        if path != "packed":  # the CPU does not align packed rows; the counts give CUDA's alignment
            assert ran.padded_tokens == counted["padded_tokens"]
