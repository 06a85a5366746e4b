"""Trustworthy state (issue 12): no stage reuses an output that its current inputs and settings did not make, and
none exits 0 on stale or foreign inputs. The synthetic competition, a tiny model, real CLI calls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import train_helpers
from ich_kaggle import train
from ich_kaggle.core import config, manifest
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout, Run
from ich_kaggle.core.lock import exclusive
from ich_kaggle.predict.stage import predict

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    *train_helpers.FAST,
    "model.backbone=small_cnn",
    "train.epochs=2",
    "stack.model=conv",
    "stack.epochs=2",
    "stack.hidden=8",
    "stack.batch_series=4",
]


@pytest.fixture(scope="module")
def exp(competition, tmp_path_factory):
    """Folds 0 and 1 trained to the end; fold 2 stopped after its first of two epochs."""
    root = tmp_path_factory.mktemp("state")
    layout = Layout.of(competition(seed=1), root / "work")
    cfg = config.load("tiny", SETTINGS)
    runs = root / "runs"
    for fold in (0, 1):
        train.train_fold(cfg, layout, fold, runs=runs)
    train.train_fold(cfg, layout, 2, runs=runs, stop_after_epochs=1)
    return cfg, layout, runs


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ich_kaggle", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def experiment_args(cfg, layout, runs) -> list[str]:
    return train_helpers.experiment_args("tiny", layout.data, layout.work, runs, *SETTINGS)


def test_unfinished_fold_is_never_used_for_prediction(exp):
    cfg, layout, runs = exp
    run = Run.of(runs, cfg.name)
    assert run.fold(2).best.exists() and not run.fold(2).done.exists()
    with pytest.raises(UserError, match=r"fold\(s\) \[2\] of tiny have a best.pt but their training did not finish"):
        predict(cfg, layout, runs=runs)
    out = cli("predict", *experiment_args(cfg, layout, runs))  # the same through the CLI: one line, exit 2
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "make train fold=2" in out.stderr
    assert not run.predictions.test.exists()


def test_finish_training_then_predict_reuse_and_tta_change(exp, capsys):
    cfg, layout, runs = exp
    run = Run.of(runs, cfg.name)
    out = cli("predict", *experiment_args(cfg, layout, runs), "--finish-training")
    assert out.returncode == 0, out.stderr
    assert run.fold(2).done.exists()  # resumed to the end, then predicted with all three folds
    first = pd.read_csv(run.predictions.test)
    predict(cfg, layout, runs=runs)
    assert "fold(s) [0, 1, 2] already predicted" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(run.predictions.test), first)

    flipped = config.load("tiny", [*SETTINGS, "tta.transforms=identity"])  # a TTA change is a new prediction
    predict(flipped, layout, runs=runs)
    printed = capsys.readouterr().out
    assert "already predicted" not in printed and "tta" in printed
    assert not pd.read_csv(run.predictions.test).equals(first)
    predict(cfg, layout, runs=runs)  # and back
    pd.testing.assert_frame_equal(pd.read_csv(run.predictions.test), first)


def _predicted_and_stacked(exp) -> Run:
    """The experiment with every fold trained, predicted and stacked (each step reuses what is fresh)."""
    from ich_kaggle.stack.stage import stack

    cfg, layout, runs = exp
    run = Run.of(runs, cfg.name)
    if not run.fold(2).done.exists():
        train.train_fold(cfg, layout, 2, runs=runs)
    predict(cfg, layout, runs=runs)
    stack(cfg, layout, runs=runs, progress=False)
    return run


@pytest.mark.slow
def test_stack_is_reused_when_fresh_and_redone_after_new_predictions(exp, capsys):
    from ich_kaggle.stack.stage import stack

    cfg, layout, runs = exp
    run = _predicted_and_stacked(exp)
    made = run.stack.test.stat().st_mtime_ns
    capsys.readouterr()
    stack(cfg, layout, runs=runs, progress=False)
    assert "is up to date" in capsys.readouterr().out and run.stack.test.stat().st_mtime_ns == made
    predict(config.load("tiny", [*SETTINGS, "tta.transforms=identity"]), layout, runs=runs)  # new first stage
    out = cli("submit", *experiment_args(cfg, layout, runs), "--out-dir", str(runs / "subs"))
    assert out.returncode == 2 and "predictions/test.csv is stale" in out.stderr  # made with another TTA
    predict(cfg, layout, runs=runs)
    out = cli("submit", *experiment_args(cfg, layout, runs), "--out-dir", str(runs / "subs"))
    assert out.returncode == 0, out.stderr
    assert run.stack.test.stat().st_mtime_ns > made  # the stale stack was recomputed before submitting
    assert "OOF weighted log loss: stacked" in out.stdout  # fresh again, so submit chose between it and the first stage


def test_submit_chooses_by_oof_and_takes_the_first_stage_when_the_stack_is_worse(exp, capsys):
    from ich_kaggle.core.labels import LABELS
    from ich_kaggle.stack.stage import stack
    from ich_kaggle.submit.stage import submit

    cfg, layout, runs = exp
    run = _predicted_and_stacked(exp)
    capsys.readouterr()
    submit(cfg, layout, runs=runs, out_dir=runs / "subs")
    assert "OOF weighted log loss: stacked" in capsys.readouterr().out
    choice = json.loads(run.choice.read_text())
    losses = choice["oof_log_loss"]
    assert choice["stage"] == min(losses, key=losses.get)  # the lower OOF loss wins, whichever it is
    # the stacker made worse on purpose: its predictions inverted, its manifests saying so (so it is still fresh)
    for path in (run.stack.oof, run.stack.test):
        frame = pd.read_csv(path)
        frame[list(LABELS)] = 1.0 - frame[list(LABELS)]
        frame.to_csv(path, index=False)
        manifest.adopt(path)
    submit(cfg, layout, runs=runs, out_dir=runs / "subs")
    printed = capsys.readouterr().out
    assert "using the first stage" in printed and "stacking did not lower the OOF loss" in printed
    choice = json.loads(run.choice.read_text())
    assert (
        choice["stage"] == "first_stage" and choice["oof_log_loss"]["stacked"] > choice["oof_log_loss"]["first_stage"]
    )
    assert f"from {run.predictions.test}" in printed  # the submission was written from the first stage
    stack(cfg, layout, runs=runs, progress=False, force=True)  # leave a real stack for the other tests


@pytest.mark.slow
def test_a_fold_in_training_is_locked(exp):
    cfg, layout, runs = exp
    lock = Run.of(runs, cfg.name).fold(0).lock
    with exclusive(lock, "fold 0 of tiny"):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        out = cli("train", *experiment_args(cfg, layout, runs), "--fold", "0", "--force")  # it would write the fold
        assert out.returncode == 2 and out.stderr.count("\n") == 1
        assert f"fold 0 of tiny is in use by pid {os.getpid()}" in out.stderr and str(lock) in out.stderr
    assert not lock.exists()
    # a lock left by a killed run (its pid is gone) is stale: taken over, and released when the fold is done
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "earlier"}))
    out = cli("train", *experiment_args(cfg, layout, runs), "--fold", "0", "--force")
    assert out.returncode == 0, out.stderr
    assert Run.of(runs, cfg.name).fold(0).done.exists() and not lock.exists()


@pytest.mark.slow
def test_folds_of_another_k_stop_train_and_rebuilt_folds_stop_resume(exp, tmp_path):
    cfg, layout, runs = exp
    out = cli("train", *experiment_args(cfg, layout, runs), "cv.k=4", "--fold", "0")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "was made with k=3, seed=0 but this config asks for cv.k=4" in out.stderr
    # a repeated --set applies every override, in order (the last one wins for the same key)
    out = cli("train", *experiment_args(cfg, layout, runs), "--set", "cv.k=4", "--set", "cv.k=3", "--fold", "0")
    assert out.returncode == 0, out.stderr
    # folds.csv edited since fold 0 trained (one patient moved): the fold no longer matches its images and says so
    saved = layout.folds_csv.read_bytes()
    try:
        table = pd.read_csv(layout.folds_csv, dtype=str)
        moved = table.loc[table["fold"] == "0", "patient_id"].iloc[0]
        table.loc[table["patient_id"] == moved, "fold"] = "1"
        table.to_csv(layout.folds_csv, index=False)
        with pytest.raises(UserError, match="trained on other images than fold 0"):
            train.train_fold(cfg, layout, 0, runs=runs)
    finally:
        layout.folds_csv.write_bytes(saved)


PER_FOLD = ["stack.use_embeddings=true", "stack.embedding_space=per_fold", "stack.embedding_dim=4"]


@pytest.mark.slow
def test_per_fold_embedding_stack_end_to_end_reused_and_redone_when_the_knob_changes(exp, capsys):
    """stack.embedding_space=per_fold (issue 15, item 3): predict -> stack -> submit on the tiny competition, each
    fold model's own files (test_fold<k>_embeddings.npz ...) read and named in the stack's manifest; a second run
    reuses the stack, a change of the knob recomputes it."""
    from ich_kaggle.core import freshness, manifest
    from ich_kaggle.stack.stage import prediction_dirs, stack

    cfg, layout, runs = exp
    run = Run.of(runs, cfg.name)
    if not run.fold(2).done.exists():
        train.train_fold(cfg, layout, 2, runs=runs)
    per = config.load("tiny", [*SETTINGS, *PER_FOLD])
    predict(cfg, layout, runs=runs, reads=per.stack)  # as an ensemble's members are predicted for its stack
    for k in (0, 1, 2):  # predict writes each fold model's embeddings, as the components the stack reads (issue 26)
        with np.load(run.predictions.test_fold_embeddings(k)) as z:
            assert z["emb"].shape[1] == 4 and z["emb"].dtype == np.float16
        assert run.predictions.fold_projection(k).exists()
    assert not run.predictions.test_embeddings.exists()  # the mixture's combined file: nothing reads it
    stack(per, layout, runs=runs, progress=False, force=True)
    made = run.stack.test.stat().st_mtime_ns
    saved = manifest.read(run.stack.test)
    expected = freshness.stacked(prediction_dirs(per, runs), layout, per.stack, per.cv)
    assert manifest.check(run.stack.test, expected) == []
    assert "source0:test_fold2_embeddings.npz" in saved["inputs"] and saved["settings"]["embedding_space"] == "per_fold"
    test = pd.read_csv(run.stack.test)
    assert len(test) == len(pd.read_csv(run.predictions.test)) and test.drop(columns="image_id").notna().all().all()
    capsys.readouterr()
    stack(per, layout, runs=runs, progress=False)
    assert "is up to date" in capsys.readouterr().out and run.stack.test.stat().st_mtime_ns == made
    out = cli("submit", *experiment_args(cfg, layout, runs), *PER_FOLD, "--out-dir", str(runs / "subs"))
    assert out.returncode == 0, out.stderr
    assert "OOF weighted log loss: stacked" in out.stdout and run.stack.test.stat().st_mtime_ns == made  # reused
    mixture = [*PER_FOLD[:-2], "stack.embedding_space=mixture", PER_FOLD[-1]]
    predict(cfg, layout, runs=runs, reads=config.load("tiny", [*SETTINGS, *mixture]).stack)  # its full embeddings
    out = cli("submit", *experiment_args(cfg, layout, runs), *mixture, "--out-dir", str(runs / "subs"))
    assert out.returncode == 0, out.stderr
    assert run.stack.test.stat().st_mtime_ns > made  # the knob changed: the stack was recomputed
    assert manifest.read(run.stack.test)["settings"]["embedding_space"] == "mixture"
