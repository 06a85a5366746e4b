"""An interrupted `make recipe` resumes to the same submission, byte for byte (issue 21): Ctrl-C during a fold's
training and again during the second stage, each rerun picking up where the last stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import FAST, experiment_args

ROOT = Path(__file__).resolve().parents[1]


def _recipe(data: Path, tmp: Path, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ich_kaggle",
        "recipe",
        *experiment_args("tiny", data, tmp / f"work_{name}", tmp / f"runs_{name}", *FAST, "train.epochs=1"),
        "--out-dir",
        str(tmp / f"subs_{name}"),
        "--gpus",
        "0",
    ]


def _run_until(argv: list[str], marker: str | None) -> tuple[int, str]:
    """Run the recipe; with `marker`, send SIGINT as soon as a line containing it is printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker and marker in line:
            proc.send_signal(signal.SIGINT)
            marker = None
    return proc.wait(timeout=600), "".join(lines)


@pytest.mark.slow
def test_interrupted_recipe_resumes_to_a_byte_identical_submission(synth_dir, tmp_path):
    code, out = _run_until(_recipe(synth_dir, tmp_path, "whole"), None)
    assert code == 0, out[-3000:]
    whole = (tmp_path / "subs_whole" / "tiny.csv").read_bytes()

    argv = _recipe(synth_dir, tmp_path, "cut")
    code, out = _run_until(argv, "[recipe] training tiny fold 1")  # Ctrl-C while a fold trains
    assert code == 130 and "rerun the same command to resume" in out, out[-3000:]
    assert not (tmp_path / "subs_cut" / "tiny.csv").exists()
    code, out = _run_until(argv, "stack: ")  # the rerun skips fold 0, then Ctrl-C in the second stage
    assert code == 130 and "fold 0" in out and "is already trained" in out, out[-3000:]
    code, out = _run_until(argv, None)
    assert code == 0, out[-3000:]
    assert (tmp_path / "subs_cut" / "tiny.csv").read_bytes() == whole
