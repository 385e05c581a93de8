"""Stage ``analyze_issue205``, becoming a package (the next commit splits it into its parts)."""

from jobs.analyze_issue205.results import SPEC, main

__all__ = ["SPEC", "main"]
