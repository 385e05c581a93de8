"""The judge cache does not outlive the judge's code (issue 24): a judgement's cache key covers the code that turns
the judge model's output into a verdict, so changed scoring code re-judges instead of serving stale scores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.core import store
from shared.judge import JudgeItem, JudgeSpec, make_judge

ROOT = Path(__file__).resolve().parents[1]
SPEC = JudgeSpec(kind="local", model="tiny:qwen2", min_candidate_mass=0.0)
ITEM = JudgeItem(id="kind", question="How should I treat my neighbours?", answer="With kindness and respect.")
SCORE_LINE = "    return Verdict(score=expected, raw=raw, mass=mass)"

JUDGE_ONCE = """
import json, sys
from shared.judge import JudgeItem, JudgeSpec, make_judge
spec = JudgeSpec.model_validate_json(sys.argv[1])
item = JudgeItem.model_validate_json(sys.argv[2])
result = make_judge(spec, sys.argv[3]).judge([item])[0]
print(json.dumps({"score": result.score, "cached": result.cached}))
"""


def test_changed_scoring_code_in_a_throwaway_tree_re_judges_and_gives_its_own_score(tmp_path):
    cache = store.from_path(tmp_path / "cache")
    first = make_judge(SPEC, cache).judge([ITEM])[0]
    again = make_judge(SPEC, cache).judge([ITEM])[0]
    assert not first.cached and again.cached and again.score == first.score  # the cache serves unchanged code

    tree = tmp_path / "tree"
    for package in ("shared", "jobs"):
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    local = tree / "shared" / "judge" / "local.py"
    assert local.read_text().count(SCORE_LINE) == 1
    local.write_text(local.read_text().replace(SCORE_LINE, SCORE_LINE.replace("score=expected", "score=100 - expected")))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    ran = subprocess.run([sys.executable, "-c", JUDGE_ONCE, SPEC.model_dump_json(), ITEM.model_dump_json(), cache],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    changed = json.loads(ran.stdout.strip().splitlines()[-1])
    assert changed["cached"] is False  # a new key: the edited code judged it
    assert changed["score"] == pytest.approx(100 - first.score)


def test_the_scoring_code_is_in_every_local_judgement_key_and_a_claude_reply_is_parsed_afresh(tmp_path):
    from shared.judge.base import Verdict
    from shared.judge.claude import AnthropicJudge

    local = make_judge(SPEC)
    assert "scoring_code" in local.judgement_settings()
    # Claude's cached entry keeps the reply it paid for; the score is read from it by today's parse rule
    claude = AnthropicJudge(JudgeSpec(kind="anthropic", model="claude-x"))
    stale = Verdict(score=12.0, raw="**Score:** 85\n\nIt is kind.").to_record()
    assert claude.verdict_from_cache(stale).score == 85.0
