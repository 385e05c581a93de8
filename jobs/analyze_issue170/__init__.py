"""Stage ``analyze_issue170``: every cell's α, EM rate and classifier C with question-clustered intervals, per
training seed and pooled across seeds; the fit of every learned prompt to the teacher on the test split beside the
oracle and null anchors; the random-suffix null; GCG's candidate screen and its measured agreement; the learned
suffixes as text; the projection table; judge checks and error rates; and the H1/H2/H3 decision rules as amended in
the record, decided on interval bounds, per seed and pooled.

The analysis has four parts, each a module of this package, imported only downward (results <- decisions <-
figures, report <- stage): ``results`` (every number, read and recomputed from the stored per-item artifacts),
``decisions`` (the record's pre-registered rules applied to the results), ``figures`` (``draw_figures``) and
``report`` (``report_text``), which print the results object and nothing else. ``headline.json`` is the results
object with its decisions.

The stage: ``stage.py`` holds ``run``, ``SPEC`` and ``main``; ``python -m jobs.analyze_issue170 --config F``
runs it (``__main__.py``). The registry finds ``SPEC`` here.
"""

from jobs.analyze_issue170.stage import SPEC, main

__all__ = ["SPEC", "main"]
