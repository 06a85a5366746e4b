"""One trust chain from the DICOMs to the submission (issue 21): no stage consumes what an earlier stage would refuse.

Each test is one case a careless user tried: an edit upstream (labels, folds, config, a member's fold, a cache entry,
an output cut short) must make every later stage recompute or stop with one line naming the fix, never exit 0 on it.
A two-member ensemble (tiny + tiny_bone, 2 folds, 1 epoch) on the synthetic competition is trained and predicted ONCE
per session; each test restores a pristine copy of that whole tree at the same path (manifests record paths).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

import train_helpers
from ich_kaggle import cli
from ich_kaggle.core import config, manifest
from ich_kaggle.core.labels import LABELS
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Run

SETTINGS = [
    *train_helpers.FAST,
    "cv.k=2",
    "model.backbone=small_cnn",
    "train.epochs=1",
    "stack.model=conv",
    "stack.epochs=2",
    "stack.hidden=8",
    "stack.batch_series=4",
]


class Exp:
    """The experiment tree: competition data, work folder, runs, submissions and the ensemble YAML."""

    def __init__(self, root: Path):
        self.root = root
        self.data, self.work, self.runs, self.subs = root / "comp", root / "work", root / "runs", root / "subs"
        self.ens = root / "pair.yaml"

    def args(
        self,
        config: str | None = None,
        *extra: str,
        sets: tuple[str, ...] = (),
        data: Path | None = None,
        work: Path | None = None,
    ) -> list[str]:
        return [
            "--config",
            config or str(self.ens),
            "--data",
            str(data or self.data),
            "--work",
            str(work or self.work),
            "--runs",
            str(self.runs),
            *extra,
            "--set",
            *SETTINGS,
            *sets,
        ]

    def run(self, stage: str, config: str | None = None, *extra: str, **kw) -> int:
        if stage == "submit":
            extra = ("--out-dir", str(self.subs), *extra)
        return cli.main([stage, *self.args(config, *extra, **kw)])

    @property
    def submission(self) -> Path:
        return self.subs / "pair.csv"

    def pred(self, config: str = "pair"):
        return Run.of(self.runs, config).predictions

    def fold(self, member: str, k: int):
        return Run.of(self.runs, member).fold(k)


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    """Trained, predicted and submitted once: (the live tree, its pristine copy)."""
    from ich_kaggle.data import synth

    base = tmp_path_factory.mktemp("trust")
    exp = Exp(base / "exp")
    exp.root.mkdir()
    synth.write_competition(exp.data, seed=3, studies=8, slices=6, size=48)
    exp.ens.write_text(
        yaml.safe_dump({"ensemble": {"members": ["tiny", "tiny_bone"], "combine": "mean"}, "cv": {"k": 2}})
    )
    for stage in ("train", "predict", "submit"):
        extra = ("--fold", "all") if stage == "train" else ()
        assert exp.run(stage, None, *extra) == 0
    shutil.copytree(exp.root, base / "pristine", symlinks=True)
    return exp.root, base / "pristine"


@pytest.fixture
def exp(pristine) -> Exp:
    live, copy = pristine
    shutil.rmtree(live)
    shutil.copytree(copy, live, symlinks=True)
    return Exp(live)


def one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def refused(exp: Exp, capsys, stage: str, config: str | None = None, *extra: str, **kw) -> str:
    """Run a stage that must stop: exit 2 and one line, returned."""
    capsys.readouterr()
    assert exp.run(stage, config, *extra, **kw) == 2
    return one_error(capsys)


# --- the nine silent cases -------------------------------------------------------------------------------------------


def test_submit_refuses_member_fold_retrained_after_predict(exp, capsys):
    before = exp.submission.read_bytes()
    assert exp.run("train", "tiny", "--fold", "0", "--force") == 0
    err = refused(exp, capsys, "submit")
    assert "stale" in err and "make predict" in err
    assert exp.submission.read_bytes() == before
    assert exp.run("predict") == 0 and exp.run("submit") == 0  # predicting again repairs the chain


def test_predict_refuses_labels_edited_under_trained_folds(exp, capsys):
    folds = (exp.work / "folds.csv").read_bytes()
    labels = exp.data / "stage_2_train.csv"
    frame = pd.read_csv(labels)
    images = frame["ID"].str.rsplit("_", n=1).str[0]
    frame[images.isin(images.unique()[: len(images.unique()) * 2 // 3])].to_csv(labels, index=False)  # a third gone
    for stage in ("predict", "submit"):
        err = refused(exp, capsys, stage)
        assert "stage_2_train.csv" in err and "FORCE=1" in err and "--force" in err
    assert (exp.work / "folds.csv").read_bytes() == folds  # never rebuilt under the trained folds


def test_predict_refuses_another_data_folder(exp, capsys):
    from ich_kaggle.data import synth

    other = synth.write_competition(exp.root / "other", seed=4, studies=8, slices=6, size=48)
    err = refused(exp, capsys, "predict", data=other, work=exp.root / "other_work")
    assert "other images" in err and "FORCE=1" in err


@pytest.mark.parametrize("edit", ["train.lr=0.002", "data.windows=[brain,bone,subdural]", "model.dropout=0.3"])
def test_predict_and_submit_refuse_config_edited_after_training(exp, capsys, edit):
    key = edit.split("=")[0]
    for stage in ("predict", "submit"):
        err = refused(exp, capsys, stage, sets=(edit,))
        assert key in err and "FORCE=1" in err and "--force" in err


def test_submit_refuses_test_predictions_cut_short(exp, capsys):
    before = exp.submission.read_bytes()
    test = exp.pred().test
    test.write_text("".join(test.read_text().splitlines(keepends=True)[:4]))
    err = refused(exp, capsys, "submit")
    assert "test.csv changed since it was written (4 lines now, 13 when written" in err and "make predict" in err
    assert exp.submission.read_bytes() == before
    assert exp.run("predict") == 0 and exp.run("submit") == 0
    assert exp.submission.read_bytes() == before  # recomputed from the members' files: the same submission


def test_stack_and_submit_refuse_member_oof_cut_in_half(exp, capsys):
    oof = exp.pred("tiny").oof
    lines = oof.read_text().splitlines(keepends=True)
    oof.write_text("".join(lines[: len(lines) // 2]))
    assert "tiny/predictions/oof.csv" in refused(exp, capsys, "stack")
    assert "stale" in refused(exp, capsys, "submit")
    assert exp.run("predict") == 0 and len(oof.read_text().splitlines()) == len(lines)


def test_submit_refuses_sample_of_another_test_set(exp, capsys):
    before = exp.submission.read_bytes()
    sample = exp.data / "stage_2_sample_submission.csv"
    frame = pd.read_csv(sample)
    frame["ID"] = "ID_other" + frame["ID"].str.slice(2)
    frame.to_csv(sample, index=False)
    assert "predicted (the sample of another test set?)" in refused(exp, capsys, "submit")
    assert exp.submission.read_bytes() == before


@pytest.mark.parametrize("bad", ["duplicate", "header_only"])
def test_submit_keeps_the_previous_file_on_a_bad_sample(exp, capsys, bad):
    before = exp.submission.read_bytes()
    sample = exp.data / "stage_2_sample_submission.csv"
    frame = pd.read_csv(sample)
    frame = pd.concat([frame, frame.iloc[:1]]) if bad == "duplicate" else frame.iloc[:0]
    frame.to_csv(sample, index=False)
    err = refused(exp, capsys, "submit")
    assert ("duplicate" in err) if bad == "duplicate" else ("header only" in err)
    assert exp.submission.read_bytes() == before and (exp.subs / "pair.csv.gz").exists()


def test_preprocess_rebuilds_a_damaged_cache_entry_from_its_dicom(exp, capsys):
    from ich_kaggle.core.layout import Layout
    from ich_kaggle.data import cache

    layout = Layout.of(exp.data, exp.work)
    victim = pd.read_csv(exp.pred("tiny").test)["image_id"].iloc[0]
    path = cache.cache_path(layout, victim)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])  # cut short
    assert cli.main(["preprocess", "--data", str(exp.data), "--work", str(exp.work), "--workers", "1"]) == 0
    assert "1 new" in capsys.readouterr().out
    assert path.read_bytes() == good
    cache.load_hu(layout, victim)  # decodes


def test_predict_never_gives_a_damaged_cache_entry_the_prior(exp, capsys):
    from ich_kaggle.core.layout import Layout
    from ich_kaggle.data import cache

    before = exp.submission.read_bytes()
    import os

    victim = pd.read_csv(exp.pred("tiny").test)["image_id"].iloc[0]
    path = cache.cache_path(Layout.of(exp.data, exp.work), victim)
    st = path.stat()
    path.write_bytes(b"\0" * st.st_size)  # damage that size and mtime do not show (bit rot): found by decoding
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    for member in ("tiny", "tiny_bone", "pair"):  # predicted from scratch, as on a first predict
        shutil.rmtree(exp.pred(member).dir)
    assert exp.run("predict") == 0 and exp.run("submit") == 0
    assert victim in set(pd.read_csv(exp.pred().test)["image_id"])
    assert exp.submission.read_bytes() == before


def test_kernel_datasets_refuses_an_unfinished_fold(exp, capsys):
    exp.fold("tiny_bone", 1).done.unlink()
    err = refused(exp, capsys, "kernel-datasets", None, "--out", str(exp.root / "kernels"), "--username", "someone")
    assert "fold(s) [1] of tiny_bone did not finish training" in err and "make train FOLD=1 CONFIG=tiny_bone" in err
    assert not (exp.root / "kernels").exists() or not any((exp.root / "kernels").glob("*model*"))


def test_config_rejects_duplicate_yaml_keys(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("data:\n  image_size: 64\ntrain:\n  epochs: 1\ndata:\n  num_workers: 0\n")
    with pytest.raises(UserError, match="twice.yaml: line 5: key 'data' is given twice"):
        config.load(str(path))


# --- tracebacks and stuck states -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[]", '{"inputs": []}', '{"kind": "predictions", "version": "1", "inputs": {}}'])
def test_a_malformed_manifest_is_treated_as_absent(exp, capsys, text):
    before = exp.submission.read_bytes()
    manifest.path_of(exp.pred().test).write_text(text)  # the ensemble's first stage
    manifest.path_of(exp.pred("tiny").oof_fold(0)).write_text(text)  # a member's fold predictions
    assert "no manifest" in refused(exp, capsys, "submit")
    assert exp.run("predict") == 0 and exp.run("submit") == 0  # recomputed, not a traceback
    assert exp.submission.read_bytes() == before


def test_submit_out_dir_that_is_a_file_is_one_line(exp, capsys):
    (exp.root / "afile").write_text("x")
    err = refused(exp, capsys, "submit", None, "--out-dir", str(exp.root / "afile"))
    assert "is a file, not a folder" in err


def test_score_rejects_ids_with_trailing_nul_bytes(tmp_path, capsys):
    truth, sub = tmp_path / "truth.csv", tmp_path / "sub.csv"
    ids = [f"ID_abc_{label}" for label in LABELS]
    pd.DataFrame({"ID": ids, "Label": [0] * 6}).to_csv(truth, index=False)
    sub.write_bytes(
        ("ID,Label\n" + "".join(f"{i}{chr(0) * 2 if n == 0 else ''},0.1\n" for n, i in enumerate(ids))).encode()
    )
    assert cli.main(["validate", "--sample", str(truth), "--submission", str(sub)]) != 0
    capsys.readouterr()
    assert cli.main(["score", "--truth", str(truth), "--submission", str(sub)]) == 2
    assert "NUL" in one_error(capsys)


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=nan",
        "train.lr=inf",
        "train.seed=-1",
        "train.seed=99999999999999999999",
        "model.dropout=nan",
        "ensemble.members=[]",
    ],
)
def test_config_rejects_non_finite_and_out_of_range_numbers(override):
    with pytest.raises(UserError, match=override.split("=")[0].replace(".", r"\.")):
        config.load("tiny", [override])


def test_config_rejects_a_binary_yaml_and_empty_ensemble_members(tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\xfd")
    with pytest.raises(UserError, match="weights.yaml: not a text file"):
        config.load(str(binary))
    empty = tmp_path / "empty.yaml"
    empty.write_text("ensemble:\n  members: []\n")
    with pytest.raises(UserError, match="ensemble.members is empty"):
        config.load(str(empty))


def _failing_writes(monkeypatch, under: Path, errno_: int) -> None:
    """Every atomic write under `under` fails as a read-only folder (EACCES) or a full disk (ENOSPC) makes it fail."""
    import errno
    import os
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and Path(dir).resolve().is_relative_to(under.resolve()):
            raise OSError(errno_, os.strerror(errno_), str(dir))
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert errno_ in (errno.EACCES, errno.ENOSPC)


def test_read_only_runs_folder_reuses_what_is_fresh(exp, capsys, monkeypatch):
    import errno

    _failing_writes(monkeypatch, exp.runs, errno.EACCES)
    exp.submission.unlink()
    assert exp.run("submit") == 0 and exp.submission.exists()  # nothing to recompute: nothing written in runs/
    assert cli.main(["compare", "--runs", str(exp.runs)]) == 0
    for member in ("tiny", "tiny_bone"):
        manifest.path_of(exp.pred(member).test).unlink()  # now predict must write: one line, no traceback
    assert "writable" in refused(exp, capsys, "predict")


def test_disk_full_is_one_line_and_keeps_the_previous_files(exp, capsys, monkeypatch):
    import errno

    before = exp.submission.read_bytes()
    pred = exp.pred().test.read_bytes()
    _failing_writes(monkeypatch, exp.root, errno.ENOSPC)
    assert "free space" in refused(exp, capsys, "submit")
    manifest.path_of(exp.pred().test).unlink()  # predict must write the ensemble's first stage again
    assert "free space" in refused(exp, capsys, "predict")
    assert exp.pred().test.read_bytes() == pred and exp.submission.read_bytes() == before
    assert not list(exp.root.rglob("*.tmp"))  # nothing partial


def test_report_exits_non_zero_on_stale_predictions(exp, capsys):
    exp.run("train", "tiny", "--fold", "1", "--force")  # after predict: the member's predictions are stale
    capsys.readouterr()
    assert exp.run("report", "tiny", "--gradcam", "0") == 2
    captured = capsys.readouterr()
    assert "stale" in captured.out + captured.err and "incomplete" in one_error_of(captured.err)


def one_error_of(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_an_empty_train_lock_does_not_block_the_fold(exp):
    lock = exp.fold("tiny", 0).lock
    lock.write_text("")  # its taker was killed between creating and writing it
    assert exp.run("train", "tiny", "--fold", "0", "--force") == 0
    assert not lock.exists()


def _stage_then(monkeypatch, action) -> None:
    def stage(args):
        action()
        return 0

    import dataclasses

    monkeypatch.setitem(cli.COMMANDS, "compare", dataclasses.replace(cli.COMMANDS["compare"], run=stage))


def test_sigterm_stops_the_run_with_rerun_to_resume(monkeypatch, tmp_path, capsys):
    import os
    import signal
    import time

    _stage_then(monkeypatch, lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(5)))
    assert cli.main(["compare", "--runs", str(tmp_path)]) == 128 + signal.SIGTERM
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_ctrl_c_swallowed_in_a_weakref_callback_still_stops_the_run(monkeypatch, tmp_path, capsys):
    import gc
    import os
    import signal
    import time
    import weakref

    class Loader:  # a DataLoader's or tqdm's finaliser runs as the fold starts
        pass

    def start_fold():
        loader = Loader()
        weakref.finalize(loader, lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))
        del loader
        gc.collect()

    _stage_then(monkeypatch, start_fold)
    assert cli.main(["compare", "--runs", str(tmp_path)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_out_of_memory_is_not_called_a_damaged_cache(exp, monkeypatch):
    from ich_kaggle.core.layout import Layout
    from ich_kaggle.data.dataset import SliceDataset

    cfg = config.load("tiny", [*SETTINGS, "data.image_size=100000"])
    frame = pd.read_csv(exp.pred("tiny").test)[["image_id"]].assign(**{label: 0 for label in LABELS})
    ds = SliceDataset(frame, Layout.of(exp.data, exp.work), cfg, transform=None, train=False)

    def out_of_memory(index):
        raise MemoryError("Unable to allocate 112. GiB for an array with shape (100000, 100000, 3)")

    monkeypatch.setattr(ds, "_item", out_of_memory)
    with pytest.raises(UserError, match="out of memory") as e:
        ds[0]
    assert "damaged" not in str(e.value) and "delete" not in str(e.value)


def test_report_exits_non_zero_when_it_skipped_a_section(exp, capsys, monkeypatch):
    from ich_kaggle.report import plots

    def broken(*args, **kwargs):
        raise RuntimeError("no space for the figure")

    monkeypatch.setattr(plots, "training_curves", broken)
    capsys.readouterr()
    assert exp.run("report", "tiny", "--gradcam", "0") == 2
    err = one_error_of(capsys.readouterr().err)
    assert "section(s) skipped" in err and "make report CONFIG=tiny" in err
    assert (exp.runs / "tiny" / "report" / "index.html").exists()  # the rest of the page is there
