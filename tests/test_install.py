"""The package as pip sees it: pyproject.toml names every package of the pinned lock (requirements.txt), runtime or
test extra, and its console script points at the CLI."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_pyproject_lists_every_locked_package_and_nothing_else():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_name(r) for r in project["dependencies"]}
    test = {_name(r) for r in project["optional-dependencies"]["test"]}
    lock = {
        _name(line)
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not runtime & test
    assert runtime | test == lock, (
        f"only in the lock: {lock - runtime - test}; only in pyproject: {runtime | test - lock}"
    )


def test_console_script_is_the_cli():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, func = project["scripts"]["ich-kaggle"].split(":")
    assert getattr(importlib.import_module(module), func) is importlib.import_module("ich_kaggle.cli").main
