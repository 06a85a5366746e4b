"""Shared fixtures: the real mini set from ../shared (skipped with a reason when absent) and the synthetic
competition."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MINI_TAR = SHARED / "rsna-ich-mini.tar.xz"
CACHE = ROOT / ".cache"

os.environ.setdefault("MPLBACKEND", "Agg")
# one thread in every test process and subprocess (see one_torch_thread): the same arithmetic everywhere, so
# results computed in-process and in a subprocess (kernel vs make submit) agree to the last digit
os.environ["OMP_NUM_THREADS"] = "1"
# `make test` exports ICH_KAGGLE_MAKE=1 (messages then name Make variables); tests check the flag forms
os.environ.pop("ICH_KAGGLE_MAKE", None)
# tests never download: a missing ImageNet weights file is an error naming its URL (models/weights.py)
os.environ["ICH_KAGGLE_OFFLINE"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (still run in CI)")


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(
            f"{path} is absent: tests on real competition data need the ../shared folder beside the project (CI has it)"
        )
    return path


@pytest.fixture(scope="session")
def mini_dir() -> Path:
    """The real RSNA mini set, extracted once into .cache/ (reused across test runs)."""
    tar = shared_file("rsna-ich-mini.tar.xz")
    out = CACHE / "rsna-ich-mini"
    done = out / ".extracted"
    if not done.exists():
        CACHE.mkdir(exist_ok=True)
        with tarfile.open(tar) as t:
            t.extractall(CACHE, filter="data")
        done.touch()
    return out


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic competition (the demo's generator at test size)."""
    from ich_kaggle.data import synth

    out = tmp_path_factory.mktemp("synth") / "comp"
    synth.write_competition(out, seed=0)
    return out


@pytest.fixture
def kaggle_home(tmp_path, monkeypatch) -> Path:
    """`import kaggle` authenticates at import time: give it fake credentials in a temporary HOME."""
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_USERNAME", "testuser")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef0123456789abcdef")
    monkeypatch.delenv("KAGGLE_CONFIG_DIR", raising=False)
    return home


@pytest.fixture(scope="session", autouse=True)
def library_messages_on_stdout():
    """As the CLI does: the library's log lines on stdout, where capsys sees them."""
    from ich_kaggle.core import log

    log.show()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread per test process: DDP and subprocess tests share 2 cores, and OpenMP threads fighting
    over them made tests 5-10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A model bundle as a user makes one, at test size: the `tiny` config trained 1 epoch on 2 folds of a small
    synthetic competition, predicted, submitted, exported (~10 s of CPU, once per session)."""
    import contextlib
    import io

    import train_helpers
    from ich_kaggle.cli import main
    from ich_kaggle.data import synth

    tmp = tmp_path_factory.mktemp("tiny_bundle")
    data = synth.write_competition(tmp / "comp", seed=3, studies=6, slices=8, size=64)
    exp = [
        "--config",
        "tiny",
        "--data",
        str(data),
        "--work",
        str(tmp / "work"),
        "--runs",
        str(tmp / "runs"),
        "--set",
        *train_helpers.FAST,
        "cv.k=2",
        "train.epochs=1",
    ]
    for step in (
        ["train", *exp, "--fold", "all"],
        ["predict", *exp],
        ["submit", *exp, "--out-dir", str(tmp / "subs")],
        ["export", *exp, "--out", str(tmp / "bundle")],
    ):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(step)
        assert code == 0, (step[0], err.getvalue()[-2000:])
    return tmp / "bundle"
