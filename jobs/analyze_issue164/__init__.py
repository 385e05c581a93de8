"""Stage ``analyze_issue164``, becoming a package (the next commit splits it into its parts)."""

from jobs.analyze_issue164.report import SPEC, main

__all__ = ["SPEC", "main"]
