"""Stage ``analyze_issue81``: #81's hypotheses, figures and report from the stored marker rates, judge scores and
base-model centroids, per training seed and across seeds. Every number is recomputed here from those artifacts.

The stage has four parts, each a module of this package, imported only downward (results <- decisions <-
figures, report <- stage): ``results`` (every number, from the artifacts), ``decisions`` (the pre-registered
rules applied to those numbers, per seed and pooled), ``figures`` (``draw_figures``) and ``report``. One results
object holds every number that the report, the figures and ``headline.json`` print; the decisions are part of it.

The stage: ``stage.py`` holds ``run``, ``SPEC`` and ``main``; ``python -m jobs.analyze_issue81 --config F``
runs it (``__main__.py``). The registry finds ``SPEC`` here.

Units. A training seed replicates the whole recipe of a source (its on-policy data, negatives, LoRA and
evaluation sampling). Within one seed, the completions of one question share its prompt, so every interval
resamples questions (``shared.analysis.stats.clustered_rate_bootstrap``), never single completions; between seeds, a claim
about a source's leakage is a t interval over the seeds' values (``shared.analysis.stats.seed_contrast``). With one seed,
every p-value is conditional on that one fine-tune and the report says so.

Estimands (as the record pins them; rates are base-subtracted: rate(source model) - rate(base model)):

- Leakage per source and seed: the rate on the source's own pure-noun bystander (implantation), the
  base-subtracted rate pooled over every other bystander, and on the assistant QC persona.
- H1 implantation: ``rate(source, A2/<source noun>) > 0.80``, per seed; pooled: every seed must pass.
- H2 noun vs trait, per source and seed (on the coherent subset, incoherent cells dropped):
  ``noun_effect(trait, L) = median over other nouns of |r(source_noun, trait, L) - r(other_noun, trait, L)|``
  (25 values); ``trait_effect(noun, trait, L) = median over (trait', L') != (trait, L) of
  |r(noun, trait, L) - r(noun, trait', L')|`` (125 values); H2 holds if median(noun_effect) > median(trait_effect).
  Significance per seed: a blocked permutation test of "bystanders sharing the source's noun leak more" (noun labels
  shuffled within each (source, trait, level) block); across seeds, a t-test of the seeds' differences.
- H3 gradation: per (source, noun, trait) the OLS slope of the base-subtracted rate over levels 1..5 with its 95%
  question-clustered bootstrap interval (each replicate redraws the questions, the same ones for the source's and
  the base model's cells); the record's count of triples with |slope| > half-width; a permutation p-value per
  triple (levels shuffled within each question), counted raw (with the alpha x m false positives that raw counting
  expects when no slope is real) and after Benjamini-Hochberg over the seed's triples.
- Head-to-head (#88): per Big-5 axis, adjective effect = mean |r(noun, trait, L) - r(A2 noun)| over
  (source, noun, L) (125 cells); noun swap = mean over the 25 (source, L) contexts of the median over the 10 noun
  pairs of |r(n_i) - r(n_j)|; the same with r replaced by the base-model cosine between the source's and the
  bystander's centroids at the headline layer. Axis-label permutation test per metric (range of the per-axis
  means of the adjective effect; trait labels shuffled over the 625 (source, A1) rows, n_perm draws).
- H4: base-model cosine between source and bystander centroids vs leakage; the source x pure-noun submatrix.
"""

from jobs.analyze_issue81.stage import SPEC, main

__all__ = ["SPEC", "main"]
