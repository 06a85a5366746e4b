"""Atomic writes: a failure mid-write leaves the old file intact and no temp file behind."""

import os

import pandas as pd
import pytest

from ich_kaggle.core.io import atomic_open, write_csv


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.csv"]


def test_written_files_are_readable_like_normal_files(tmp_path):
    out = write_csv(pd.DataFrame({"a": [1, 2]}), tmp_path / "sub" / "x.csv.gz")
    assert pd.read_csv(out)["a"].tolist() == [1, 2]
    normal = tmp_path / "normal"
    normal.write_text("x")
    assert oct(out.stat().st_mode & 0o777) == oct(normal.stat().st_mode & 0o777)
