"""Stack stage: a second-stage sequence model over each series' ordered slices (the arrays live in its modules)."""

from .stage import stack

__all__ = ["stack"]
