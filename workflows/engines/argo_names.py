"""What the Argo compiler (``workflows.engines.argo``) and the Argo Server client (``workflows.cluster``) both use:
the one error type of cluster operations and the names a run has on the cluster. It imports neither side, so the
two sides import it and never each other in a circle."""

from __future__ import annotations

import re


class ClusterError(RuntimeError):
    """A cluster operation cannot go ahead or failed; the message is one readable line."""


def dns_label(text: str, limit: int = 63) -> str:
    """``Issue164 full/ab12`` -> ``issue164-full-ab12``: a DNS-1123 label (workflow names, label values)."""
    out = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return out[:limit].strip("-") or "x"


def workflow_name(run_id: str) -> str:
    """The Argo workflow name of a run: the run id as a DNS label, so ``status``/``retry`` find it by run id."""
    return dns_label(run_id)


_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]+")


def label_value(text: str) -> str:
    """A Kubernetes label value: at most 63 of ``[A-Za-z0-9_.-]``, starting and ending alphanumeric."""
    out = _LABEL_VALUE.sub("-", str(text))[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", out)
