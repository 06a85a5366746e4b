"""Shared fixtures, built once per session and read by several files: the real mini set from ../shared (skipped
with a reason when absent), the synthetic competition, a trained two-member ensemble and a model bundle."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="session")
def competition(tmp_path_factory):
    """`competition(seed, studies, slices, size)`: a small synthetic competition of that shape, written once per
    session and shared by every file that asks for the same shape (the train, runs, predict, state and DICOM-source
    tests use seeds 0 and 1 at 12 studies x 8 slices x 64 px). Read only: each test keeps its own work and runs
    folders; a test that changes a DICOM or a label writes its own competition."""
    from ich_kaggle.data import synth

    made: dict[tuple[int, int, int, int], Path] = {}

    def get(seed: int = 0, studies: int = 12, slices: int = 8, size: int = 64) -> Path:
        key = (seed, studies, slices, size)
        if key not in made:
            root = tmp_path_factory.mktemp(f"comp_{seed}_{studies}x{slices}x{size}")
            made[key] = synth.write_competition(root / "comp", seed=seed, studies=studies, slices=slices, size=size)
        return made[key]

    return get


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
def pair(tmp_path_factory) -> SimpleNamespace:
    """The two-member ensemble that several files read (apply, ensemble, kernel, tiny_bundle), trained once per
    session: tiny + tiny_bone, 1 epoch, 2 folds of a small synthetic competition, then predicted (each member's
    test and out-of-fold predictions; ~10 s of CPU, 8 of them training).

    Readers share its folders, which no copy can stand in for (manifests name files by absolute path): a reader
    runs its own ensemble YAML (`train_helpers.pair_yaml`, another stem) with `exp(...)`, whose members are these
    folds, "already trained", and whose predictions are these unless stale (predict then redoes them); a reader
    that changes a member's file puts it back."""
    import train_helpers
    from ich_kaggle.data import synth

    tmp = tmp_path_factory.mktemp("pair")
    data = synth.write_competition(tmp / "comp", seed=3, studies=10, slices=8, size=64)
    work, runs = tmp / "work", tmp / "runs"

    def exp(config: str | Path, *extra: str) -> list[str]:
        """--config, the shared folders and the shared --set overrides (then `extra`) for a CLI command."""
        return train_helpers.experiment_args(config, data, work, runs, *train_helpers.PAIR_SETTINGS, *extra)

    ens = train_helpers.pair_yaml(tmp / "pair.yaml")
    for step in (["train", *exp(ens), "--fold", "all"], ["predict", *exp(ens)]):
        out = train_helpers.cli(*step)
        assert out.returncode == 0, (step[0], out.stderr[-3000:])
    return SimpleNamespace(tmp=tmp, data=data, work=work, runs=runs, yaml=ens, exp=exp)


@pytest.fixture(scope="session")
def tiny_exp(pair, tmp_path_factory) -> SimpleNamespace:
    """The session's trained `tiny` (the `pair` ensemble's first member, 2 folds; its config as that member's) as a
    user takes it on: submitted (`subs/tiny.csv`) and exported (`bundle`), under 1 s of CPU on top of `pair`. Its
    competition, work and runs folders are `pair`'s; `settings` are the --set overrides that name the experiment."""
    import train_helpers

    tmp = tmp_path_factory.mktemp("tiny_bundle")
    exp = pair.exp("tiny", *train_helpers.PAIR_MEMBER_SET)
    printed = []
    for step in (
        ["train", *exp, "--fold", "all"],
        ["predict", *exp],
        ["submit", *exp, "--out-dir", str(tmp / "subs")],
        ["export", *exp, "--out", str(tmp / "bundle")],
    ):
        out = train_helpers.cli(*step)
        assert out.returncode == 0, (step[0], out.stderr[-2000:])
        printed.append(out.stdout)
    assert printed[0].count("is already trained") == 2, printed[0]  # `pair` trained them: nothing trained again
    settings = [*train_helpers.PAIR_SETTINGS, *train_helpers.PAIR_MEMBER_SET]
    return SimpleNamespace(
        bundle=tmp / "bundle", subs=tmp / "subs", comp=pair.data, work=pair.work, runs=pair.runs, settings=settings
    )


@pytest.fixture(scope="session")
def tiny_bundle(tiny_exp) -> Path:
    """A model bundle as a user makes one, at test size (`tiny_exp`'s)."""
    return tiny_exp.bundle
