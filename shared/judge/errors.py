"""Judge failures that stop a run. Per-item failures are not exceptions: they are counted in JudgeResult.error."""

from __future__ import annotations


class JudgeError(RuntimeError):
    """A judge run cannot continue; the message is one readable line and never contains a credential."""


class JudgeConfigError(JudgeError):
    """The judge is misconfigured: missing API key, unknown template or model, bad spec."""


class JudgeAuthError(JudgeError):
    """The judge service rejected our credentials (401/403)."""
