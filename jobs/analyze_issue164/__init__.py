"""Stage ``analyze_issue164``: α and the EM rate under two judges and classifier C per condition, judge error
rates, the judges' checks, the figures and the report.

One shape, four parts, each a module of this package, imported only downward (results <- decisions <- figures,
report <- stage). ``results`` reads every number from the stored artifacts (per-item judge scores of the
alignment and coherence passes, classifier scores, judge checks, the classifier bundle; nothing is copied from an
upstream summary) into one results object; ``decisions`` applies the record's pre-registered rules to it;
``figures`` draws it; ``report`` writes it. ``headline.json`` is that object, and the report and figures print
nothing that is not in it (tests/test_issue164_analysis.py checks the report's numbers against it).

The stage: ``stage.py`` holds ``run``, ``SPEC`` and ``main``; ``python -m jobs.analyze_issue164 --config F``
runs it (``__main__.py``). The registry finds ``SPEC`` here.
"""

from jobs.analyze_issue164.stage import SPEC, main

__all__ = ["SPEC", "main"]
