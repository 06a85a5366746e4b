"""A careless user (issue 13): every mistake is one line naming the file or key and the fix, a non-zero exit, no
traceback, and nothing else lost."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import train_helpers
from ich_kaggle import train
from ich_kaggle.cli import main
from ich_kaggle.core import config
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout, Run
from ich_kaggle.models import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> SimpleNamespace:
    """The CLI's `main` in this process (a `python -m ich_kaggle` would spend most of its time importing torch and
    timm again): its exit code and what it printed, as the command line would show them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def one_line(out, *words: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "Traceback" not in out.stderr and "np." not in out.stderr
    for w in words:
        assert w in out.stderr, (w, out.stderr)


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    from ich_kaggle.data import synth

    root = tmp_path_factory.mktemp("bad")
    data = synth.write_competition(root / "comp", seed=2, studies=9, slices=6, size=48)
    return Layout.of(data, root / "work")


def args_for(layout: Layout, runs: Path) -> list[str]:
    sets = [*train_helpers.FAST, "model.backbone=small_cnn", "train.epochs=1"]
    return train_helpers.experiment_args("tiny", layout.data, layout.work, runs, *sets)


def test_fold_words_and_numbers(comp, tmp_path):
    for word in ("abc", "1.5", "-1"):
        one_line(cli("train", *args_for(comp, tmp_path / "runs"), "--fold", word), "--fold")
    one_line(cli("train", *args_for(comp, tmp_path / "runs"), "--fold", "9"), "fold 9 does not exist with cv.k=3")
    assert not (tmp_path / "runs").exists()


def test_all_folds_are_checked_before_the_first_trains(comp, tmp_path):
    from ich_kaggle.data import folds

    folds.load_folds(comp, k=3, seed=0)
    saved = comp.folds_csv.read_bytes()
    try:
        table = pd.read_csv(comp.folds_csv, dtype=str)
        table.loc[table["fold"] == "2", "fold"] = "1"  # fold 2 lost its images (a hand-edited folds.csv)
        table.to_csv(comp.folds_csv, index=False)
        out = cli("train", *args_for(comp, tmp_path / "runs"), "--fold", "ALL")
        one_line(out, "fold 2 leaves an empty validation set", str(comp.folds_csv))
        assert not (tmp_path / "runs" / "tiny" / "fold0").exists()  # nothing trained before the error
    finally:
        comp.folds_csv.write_bytes(saved)


def test_synth_out_is_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    one_line(cli("synth", "--out", str(target)), str(target), "is a file")
    assert target.read_text() == "mine"


def test_makefile_quotes_paths_with_spaces(tmp_path):
    data, runs = tmp_path / "my data", tmp_path / "my runs"
    out = subprocess.run(
        ["make", "-n", "train", f"DATA_DIR={data}", f"RUNS={runs}", "PY=true"], capture_output=True, text=True, cwd=ROOT
    )
    line = [ln for ln in out.stdout.splitlines() if "ich_kaggle train" in ln][0]
    words = shlex.split(line)
    assert words[words.index("--data") + 1] == str(data) and words[words.index("--runs") + 1] == str(runs)


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_leaves_no_debris(comp, tmp_path, monkeypatch):
    cfg = config.load("tiny", [*train_helpers.FAST, "model.backbone=small_cnn", "train.epochs=1"])
    fold = Run.of(tmp_path / "runs", cfg.name).fold(0)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(
        UserError, match=r"cannot write the checkpoint .*best.pt \(No space left on device\); free disk"
    ):
        train.train_fold(cfg, comp, 0, runs=tmp_path / "runs")
    assert not [p for p in fold.dir.iterdir() if p.name.endswith(".tmp")]
    assert not fold.lock.exists()  # the lock goes with the failed run
    monkeypatch.undo()
    (fold.dir / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a save killed with SIGKILL
    train.train_fold(cfg, comp, 0, runs=tmp_path / "runs")  # space is back: the same command trains the fold
    assert fold.done.exists() and not (fold.dir / ".last.pt.x1y2.tmp").exists()


def test_a_dicom_that_cannot_be_read_stops_the_stage_and_is_never_recorded_as_bad(tmp_path, monkeypatch, capsys):
    """Permission denied or an I/O error says nothing about the file: meta and preprocess stop with one line, record
    nothing as a bad DICOM, and the same command completes once the cause is fixed."""
    import builtins

    from ich_kaggle import cli
    from ich_kaggle.data import dicom, synth

    data = synth.write_competition(tmp_path / "comp", seed=4, studies=4, slices=4, size=32)
    victim = sorted((data / "stage_2_test").iterdir())[0]
    layout = Layout.of(data, tmp_path / "work")

    def denied(path, *args, **kwargs):
        if str(path) == str(victim):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return builtins.open(path, *args, **kwargs)

    for stage in ("meta", "preprocess"):
        if stage == "preprocess":
            assert cli.main(["meta", "--data", str(data), "--work", str(layout.work), "--workers", "1"]) == 0
        monkeypatch.setattr(dicom, "open", denied, raising=False)
        capsys.readouterr()
        assert cli.main([stage, "--data", str(data), "--work", str(layout.work), "--workers", "1"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]  # not the bars
        assert len(err) == 1 and err[0].startswith(f"error: cannot read {victim} (Permission denied)"), err
        monkeypatch.undo()
        for skipped in (layout.skipped_csv, layout.cache_skipped):
            assert not skipped.exists() or victim.name not in skipped.read_text()
    assert cli.main(["preprocess", "--data", str(data), "--work", str(layout.work), "--workers", "1"]) == 0
    from ich_kaggle.data import cache

    assert victim.stem in cache.cached_ids(layout)
