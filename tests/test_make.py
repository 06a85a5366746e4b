"""The Make front end a newcomer reads: `make help` lists every target and variable the Makefile has, the
variables reach the command, `make score` without its files stops in one line, and messages name the Make form
when run from Make."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from ich_kaggle.core import config
from ich_kaggle.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = {"PY", "EXP", "SET", "KAGGLE_ARGS", "KUSER", "MODEL_DS", "MAKEFILE_LIST", "FOLD"}


def _make(*args: str) -> subprocess.CompletedProcess:
    # -o: never (re)build .venv here; -n where only the command line matters
    return subprocess.run(
        ["make", "-s", "-o", ".venv/bin/python", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_target_and_variable():
    text = (ROOT / "Makefile").read_text()
    proc = _make("help")
    assert proc.returncode == 0, proc.stderr
    listed_targets = set(re.findall(r"^  ([a-z][a-z0-9-]*) ", proc.stdout.split("variables:")[0], re.M))
    phony = set(" ".join(re.search(r"^\.PHONY:((?:.*\\\n)*.*)", text, re.M).group(1).split("\\")).split())
    assert phony - listed_targets == set(), "targets without a `## help` comment"
    variables_part = proc.stdout.split("variables:")[1]
    documented = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)=", variables_part))
    used = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text)) - INTERNAL
    assert used - documented == set(), "variables without a `## VAR=` line"


def test_variables_reach_the_command():
    proc = _make("-n", "train", "FORCE=1", "fold=2", "CONFIG=tiny")
    assert "--fold 2 --force" in proc.stdout and '--config "tiny"' in proc.stdout
    assert "--force" not in _make("-n", "train").stdout
    assert "--force" in _make("-n", "stack", "FORCE=1").stdout
    assert "--k 3 --seed 7" in _make("-n", "folds", "K=3", "SEED=7").stdout
    assert "--k 4" in _make("-n", "kernel-prepare", "K=4").stdout
    assert "--k" not in _make("-n", "folds").stdout  # the defaults live in one place, not here
    cmd = _make("-n", "score", "TRUTH=labels.csv", "SUB=sub.csv").stdout
    assert 'score --truth "labels.csv" --submission "sub.csv"' in cmd


@pytest.mark.parametrize("args", [("score",), ("score", "TRUTH=labels.csv"), ("validate", "SUB=x.csv")])
def test_score_without_its_files_stops_in_one_line(args):
    proc = _make(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs" in lines[0] and "SUB=" in lines[0], proc.stderr


def test_advice_names_the_make_form_under_make(monkeypatch):
    with pytest.raises(UserError) as plain:
        config.selected_folds(config.CVConfig(k=3), "abc")
    assert "--fold 0..2" in str(plain.value) and "fold=" not in str(plain.value)
    monkeypatch.setenv("ICH_KAGGLE_MAKE", "1")
    with pytest.raises(UserError) as make:
        config.selected_folds(config.CVConfig(k=3), "abc")
    assert "fold=0..2 (--fold 0..2)" in str(make.value)
    assert os.environ["ICH_KAGGLE_MAKE"] == "1"
