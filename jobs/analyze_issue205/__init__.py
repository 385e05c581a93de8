"""Stage ``analyze_issue205``: #205's pre-registered geometry (M1/M2/M3) and behaviour (H1/H2/H3) statistics,
per training seed and with the seed as the unit, the decision rules, the figures and the report.

The analysis has four parts, each a module of this package, imported only downward (results <- decisions <-
figures, report <- stage): ``results`` (every number, read from the stored artifacts), ``decisions`` (the
record's pre-registered rules applied to those numbers, per seed and pooled over seeds), ``figures`` and
``report``. ``headline.json`` is the results object with its decisions; the figures and the report print that
object and nothing else.

The stage: ``stage.py`` holds ``run``, ``SPEC`` and ``main``; ``python -m jobs.analyze_issue205 --config F``
runs it (``__main__.py``). The registry finds ``SPEC`` here.

What this stage makes impossible, by construction (each was a finding of the record's review or of a referee):

- checkpoints whose persona / question / layer axes disagree are refused, not silently mis-aligned;
- Method B centroids are always formed on the questions whose reply is non-empty under *every* checkpoint of a
  seed (the paired empty-response filter), so no checkpoint is compared on a different question set;
- M3 is held-out LDA with GroupKFold by question and a joint-shuffle null (never a per-persona hold-out, which
  scored 0% on the base model), its contrasts are tested against a null of equal separability (questions swapped
  between the two checkpoints), and a base accuracy not above chance is reported as "M3 uninformative";
- M1's null swaps whole personas between the two checkpoints, not pairs;
- beside the raw geometry, a shift-invariant family (the change in between-persona dispersion, M2 centred on the
  non-assistant personas' mean) that a shift shared by every persona cannot move and that is not pinned; the mean
  shift is measured, and a rule that holds on raw geometry only is called "may be a shared shift" only where it is;
- each metric's null size and smallest attainable p are stated, with what BH and Holm can reach over the family;
- H2 is an equivalence test (TOST, the record's 15-point margin); the record's own H2 rule is printed beside it as
  what it is; H3's exact Spearman floor at the run's condition count is stated;
- claims about a training recipe (EM vs base, EM vs benign SFT) are tested with the training seed as the unit
  (``shared.analysis.stats.seed_contrast``); a one-seed run says every p-value is conditional on one fine-tune and calls no
  effect EM-specific.
"""

from jobs.analyze_issue205.stage import SPEC, main

__all__ = ["SPEC", "main"]
