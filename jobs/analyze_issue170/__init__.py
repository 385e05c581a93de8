"""Stage ``analyze_issue170``, becoming a package (the next commit splits it into its parts)."""

from jobs.analyze_issue170.report import SPEC, main

__all__ = ["SPEC", "main"]
