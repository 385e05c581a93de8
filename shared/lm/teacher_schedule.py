"""When the teacher draws: several steps' completions in one call, and the next call while the student trains.

A step's teacher completions do not depend on the learned prompt, so the teacher need not wait for the student:

- ``draw_steps`` (m): the completions of m consecutive steps are drawn in one call (one batch of m x questions x n
  rows when the generator's batch holds them): a decode step reads every weight once however many rows it serves,
  so m steps' rows cost little more than one step's. Group g holds steps g*m .. g*m + m - 1 and is seeded by
  (seed, g), so a resumed run draws the same completions for every step. With m = 1 a step is seeded by
  (seed, step) as before.
- ``overlap``: after a step takes its completions, the group of the next step is drawn in a worker thread (on CUDA
  on its own stream) while the student's forward/backward runs, so the next step finds its completions ready or
  waits only for what is left. Only for a teacher the student pass does not switch: an adapter on the student's
  weights is switched off during the student pass, and a draw then would sample the base model.

``events`` records when each draw and each student pass started and ended (the benchmark and the tests read the
schedule from it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.lm.chat import PromptIds

GROUP_STREAM = 2_000_000_011  # groups of several steps draw from a stream apart from the per-step seeds


class StepDraws:
    """The examples of each step, drawn group by group by ``draw_group(first_step, steps)`` (a list of each step's
    examples), optionally one group ahead in a worker thread."""

    def __init__(self, draw_group: Callable[[int, int], list[list[PromptIds]]], *, draw_steps: int = 1,
                 overlap: bool = False):
        if draw_steps < 1:
            raise ValueError("draw_steps must be at least 1")
        self.draw_group, self.draw_steps, self.overlap = draw_group, draw_steps, overlap
        self._ready: dict[int, list[PromptIds]] = {}
        self._pending: dict[int, Future] = {}
        self._worker: ThreadPoolExecutor | None = None
        self._stream = None
        self.events: list[tuple[str, int, float]] = []
        self._lock = threading.Lock()

    def group_of(self, step: int) -> int:
        return step // self.draw_steps

    def examples(self, step: int) -> list[PromptIds]:
        """Step ``step``'s examples: drawn before (prefetched or in its group), or drawn now with its group."""
        if step not in self._ready:
            group = self.group_of(step)
            future = self._pending.pop(group, None)
            drawn = future.result() if future is not None else self._draw(group)
            self._ready = dict(zip(self._steps(group), drawn, strict=True))
        return self._ready.pop(step)

    def prefetch(self, step: int) -> None:
        """Start drawing ``step``'s group in the worker thread, unless it is drawn or being drawn (``overlap`` only)."""
        group = self.group_of(step)
        if not self.overlap or step in self._ready or group in self._pending:
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
        self._pending[group] = self._worker.submit(self._draw_on_side_stream, group)

    def mark(self, what: str, step: int) -> None:
        with self._lock:
            self.events.append((what, step, time.perf_counter()))

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
            self._worker = None
        self._pending.clear()

    def _steps(self, group: int) -> range:
        return range(group * self.draw_steps, (group + 1) * self.draw_steps)

    def _draw(self, group: int) -> list[list[PromptIds]]:
        self.mark("draw_start", group)
        drawn = self.draw_group(group * self.draw_steps, self.draw_steps)
        self.mark("draw_end", group)
        return drawn

    def _draw_on_side_stream(self, group: int) -> list[list[PromptIds]]:
        import torch

        if not torch.cuda.is_available():
            return self._draw(group)
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        with torch.cuda.stream(self._stream):
            drawn = self._draw(group)
            self._stream.synchronize()
        return drawn
