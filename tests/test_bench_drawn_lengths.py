"""The bench's stand-in for a real teacher's stops (bench/fast_paths.py): each completion stops at the length drawn
for its row, the stop token last, so the student trains on stopped replies of the drawn lengths."""

from __future__ import annotations

from bench.fast_paths import DrawnLengthTeacher, length_budgets
from shared.lm.generation import SamplingParams, derived_seed
from shared.lm.teacher import load_teacher_student


def test_the_drawn_length_teacher_stops_each_row_at_its_drawn_length():
    pair = load_teacher_student("tiny:qwen2")
    teacher = DrawnLengthTeacher.like(pair.teacher_generator)
    params = SamplingParams(n=6, max_new_tokens=64, seed=3)
    completions = [c for cs in teacher.generate(pair.teacher_prompts(["Hi?", "What?"]), params) for c in cs]
    drawn = length_budgets(12, 64, derived_seed(3, 0)).tolist()  # one batch: the first chunk's seed
    lengths = [len(c.token_ids) + 1 for c in completions]
    assert all(c.finish_reason == "stop" and c.stop_token_id in teacher._stop_ids for c in completions), lengths
    # a row ends at its drawn length (the stop token its last) unless the random model stopped earlier by itself
    assert all(n <= d for n, d in zip(lengths, drawn, strict=True)), (lengths, drawn)
    assert sum(n == d for n, d in zip(lengths, drawn, strict=True)) >= 8, (lengths, drawn)
    assert len(set(drawn)) > 6 and min(drawn) >= 32
