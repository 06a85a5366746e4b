"""Report stage: plots and index.html for an experiment, and one table comparing experiments."""

from .stage import compare, make_report

__all__ = ["compare", "make_report"]
