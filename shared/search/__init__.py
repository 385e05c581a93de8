"""Prompt search against the teacher/student objective of ``shared.lm.teacher``: the learned soft prefix
(``soft_prompt``) and greedy coordinate gradient search over token ids (``gcg``).

May import: shared.core, shared.lm
"""
