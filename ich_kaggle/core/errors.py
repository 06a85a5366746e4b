"""One exception type for everything a user can fix; the CLI prints it as a single line.

Messages that tell the user what to rerun name the form the user typed: `make` exports ICH_KAGGLE_MAKE=1, so an
advice written as `fix("--force", "FORCE=1")` reads `FORCE=1 (--force)` under Make and `--force` otherwise.
"""

from __future__ import annotations

import os

MAKE_ENV = "ICH_KAGGLE_MAKE"  # set to 1 by the Makefile for every command it runs


class UserError(Exception):
    """A problem with the user's input (files, config, weights) whose message says what to do."""


def from_make() -> bool:
    return os.environ.get(MAKE_ENV) == "1"


def fix(cli: str, make: str) -> str:
    """The advice in the form the user can follow: the Make variable (and the flag) under Make, the flag otherwise."""
    return f"{make} ({cli})" if from_make() else cli
