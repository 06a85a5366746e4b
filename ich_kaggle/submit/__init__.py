"""Submit stage: the competition CSV, written in sample order through the validator."""

from .stage import submit, validate_file

__all__ = ["submit", "validate_file"]
