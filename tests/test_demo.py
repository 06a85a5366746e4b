"""`make demo` end to end on a small synthetic competition: the two-member ensemble's score lines, the stage submit
chose, and a valid submission."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ich_kaggle.submit import stage as submission
from ich_kaggle.data import synth
from ich_kaggle import docs
from ich_kaggle.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "model.pretrained=false",
    "data.image_size=32",
    "train.epochs=1",
    "train.max_images_per_epoch=48",
    "cv.k=3",
    "stack.epochs=3",
    "stack.max_steps=30",
    "tta.transforms=[identity,hflip]",
]


def _demo(cwd: Path, data: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "ich_kaggle", "demo", "--data", str(data), "--set", *FAST],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_demo_prints_the_ensemble_scores_and_writes_a_valid_submission(tmp_path):
    data = synth.write_competition(tmp_path / "comp", seed=3, studies=12, slices=8, size=64)
    proc = _demo(tmp_path, data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *lines, opens = proc.stdout.strip().splitlines()[-9:]
    # the last line is the command that writes and opens its report (the report finds the demo's data folder)
    assert opens == "[demo] its report: make report CONFIG=demo && xdg-open runs/demo/report/index.html"
    names = [line.split(": ")[0] for line in lines]
    assert names == [
        "prior_log_loss",
        "first_stage_log_loss[tiny]",
        "first_stage_log_loss[tiny_bone]",
        "ensemble_log_loss",
        "stacked_log_loss",
        "stacked_embeddings_log_loss",
        "blend_log_loss",
        "submit_chose",
    ]
    values = [float(re.match(r"\S+: ([0-9.]+)$", line).group(1)) for line in lines[:-1]]
    assert all(0 < v < 5 for v in values)
    chose = lines[-1].split()[1]  # submit_chose: <stage> (the lowest OOF loss of ...)
    assert chose in ("first_stage", "stacked", "stacked_embeddings", "blend")
    assert f"submit: using the {chose.replace('_', ' ')}" in proc.stdout and "the lowest OOF loss of" in lines[-1]
    assert "scored on the test labels" in proc.stdout

    sub = tmp_path / "submissions" / "demo.csv"
    sample = data / "stage_2_sample_submission.csv"
    assert submission.validate_file(sample, sub) == []
    assert len(pd.read_csv(sub)) == len(pd.read_csv(sample))
    # the demo writes where every target does (runs/<run>/); its folds record the data folder they trained on
    assert (tmp_path / "runs" / "tiny" / "fold2" / "best.pt").exists()
    assert (tmp_path / "runs" / "demo" / "choice.json").exists()

    # the printed block is saved for `make docs`, with the settings that made it; this demo is not the default one
    # (other data, FAST overrides), so it may not stand in the README: docs-check says so
    (saved,) = (tmp_path / "runs").rglob("demo.txt")  # beside the demo's run, wherever the layout puts it
    head, *block = saved.read_text().splitlines()
    assert block == lines and "cv.k=3" in head
    with pytest.raises(UserError, match="other settings"):
        docs.check(docs.README, saved)

    # a second run reuses everything (trained folds, per-fold predictions, the stack) and prints the same scores
    again = _demo(tmp_path, data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-9:] == [*lines, opens]
    printed = again.stdout + again.stderr
    assert printed.count("is already trained") == 6  # 3 folds of each of the two members
    assert "already predicted" in printed and "(same member predictions and combination); reusing" in printed
    assert printed.count("(same first-stage files, folds and settings); reusing") == 2  # both stacks
    assert "epoch 1/" not in printed  # nothing trained again
