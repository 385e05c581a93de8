"""The stage contract: how a job module runs as a stage (``stage``: typed config in, artifacts and a manifest out,
cached by code, config and inputs), the code fingerprint in its cache key (``fingerprint``), one writer per output
folder (``lease``), W&B tracking of a stage task (``tracking``), and the GPU cost of a stage task (``cost``).

It imports ``shared.lm`` for one thing: a stage's default plan-time check is ``shared.lm.chat.check_slots``.

May import: shared.core, shared.lm
"""
