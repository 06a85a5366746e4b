"""A command resolves its inputs once: one `train --fold 0` lists the DICOM folder once (issue 25)."""

from __future__ import annotations

import sys

from ich_kaggle import cli
from ich_kaggle.core import scope

from train_helpers import FAST

_LISTED: list[str] | None = None  # paths os.scandir was called on, while a test records them


def _audit(event: str, args: tuple) -> None:
    if _LISTED is not None and event == "os.scandir" and args and args[0] is not None:
        _LISTED.append(str(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only inside `_LISTED` windows


def test_one_train_lists_the_dicom_folder_once(synth_dir, tmp_path):
    global _LISTED
    work, runs = tmp_path / "work", tmp_path / "runs"
    argv = [
        "train",
        "--config",
        "tiny",
        "--data",
        str(synth_dir),
        "--work",
        str(work),
        "--runs",
        str(runs),
        "--fold",
        "0",
        "--set",
        *FAST,
        "train.epochs=1",
    ]
    _LISTED = []
    try:
        assert cli.main(argv) == 0  # meta scan, folds, cache, training and OOF, all in one command
        listed = list(_LISTED)
    finally:
        _LISTED = None
    for split in ("stage_2_train", "stage_2_test"):
        assert listed.count(str(synth_dir / split)) == 1, listed


def test_outside_a_command_every_call_computes_afresh():
    calls = []
    make = lambda: calls.append(1) or {"n": len(calls)}  # noqa: E731
    assert scope.resolved(("listing", "x"), make) == {"n": 1}
    assert scope.resolved(("listing", "x"), make) == {"n": 2}
    with scope.command_scope():
        first = scope.resolved(("listing", "x"), make)
        first["n"] = 99  # a caller's edit never reaches the next caller
        assert scope.resolved(("listing", "x"), make) == {"n": 3}
        scope.forget("listing")
        assert scope.resolved(("listing", "x"), make) == {"n": 4}
