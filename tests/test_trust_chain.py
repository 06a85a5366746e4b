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
from ich_kaggle.core.layout import Run

SETTINGS = [*train_helpers.FAST, "cv.k=2", "model.backbone=small_cnn", "train.epochs=1", "stack.model=conv",
            "stack.epochs=2", "stack.hidden=8", "stack.batch_series=4"]


class Exp:
    """The experiment tree: competition data, work folder, runs, submissions and the ensemble YAML."""

    def __init__(self, root: Path):
        self.root = root
        self.data, self.work, self.runs, self.subs = root / "comp", root / "work", root / "runs", root / "subs"
        self.ens = root / "pair.yaml"

    def args(self, config: str | None = None, *extra: str, sets: tuple[str, ...] = (), data: Path | None = None,
             work: Path | None = None) -> list[str]:
        return ["--config", config or str(self.ens), "--data", str(data or self.data), "--work", str(work or self.work),
                "--runs", str(self.runs), *extra, "--set", *SETTINGS, *sets]

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
    exp.ens.write_text(yaml.safe_dump({"ensemble": {"members": ["tiny", "tiny_bone"], "combine": "mean"},
                                       "cv": {"k": 2}}))
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
    frame.iloc[: len(frame) // 2].to_csv(labels, index=False)
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
    victim = pd.read_csv(exp.pred("tiny").test)["image_id"].iloc[0]
    cache.cache_path(Layout.of(exp.data, exp.work), victim).write_bytes(b"garbage")
    assert exp.run("predict") == 0 and exp.run("submit") == 0
    assert victim in set(pd.read_csv(exp.pred().test)["image_id"])
    assert exp.submission.read_bytes() == before


def test_kernel_datasets_refuses_an_unfinished_fold(exp, capsys):
    exp.fold("tiny_bone", 1).done.unlink()
    err = refused(exp, capsys, "kernel-datasets", None, "--out", str(exp.root / "kernels"), "--username", "someone")
    assert "fold(s) [1] of tiny_bone are not trained to the end" in err and "make train-all" in err
    assert not (exp.root / "kernels").exists() or not any((exp.root / "kernels").glob("*model*"))


def test_config_rejects_duplicate_yaml_keys(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text("data:\n  image_size: 64\ntrain:\n  epochs: 1\ndata:\n  num_workers: 0\n")
    assert cli.main(["train", "--config", str(path), "--data", str(tmp_path)]) == 2
    err = one_error(capsys)
    assert "twice.yaml: line 5: key 'data' is given twice" in err
