"""Training on Kaggle: the kernel folders pushed with the real kaggle CLI against the fake API; the wall-time estimate
and the plan (kaggle-plan) refuse a fold too long for one session; ensembles per member; fetch and status. The
journey itself, kernel by kernel on fake mounts, is tests/test_kaggle_journey.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ich_kaggle.core import config
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import COMPETITION, Layout, Run
from ich_kaggle.kaggle import build, train_build, train_run

sys.path.insert(0, str(Path(__file__).parent))
from fake_kaggle import FakeKaggle  # noqa: E402
from test_kernel import KAGGLE  # noqa: E402
from train_helpers import FAST  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = FAST + ["model.backbone=small_cnn", "train.epochs=2"]
USER = "testuser"


def _cfg():
    return config.load("tiny", OVERRIDES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic competition."""
    from ich_kaggle.data import synth

    base = tmp_path_factory.mktemp("ktrain")
    comp = synth.write_competition(base / "comp", seed=0, studies=9, slices=6, size=48)
    return {"base": base, "comp": comp}


def _input(root: Path, world: dict, notebooks: dict[str, Path]) -> Path:
    """/kaggle/input of a new-style kernel: the competition nested one level deeper, kernel outputs under their
    owner."""
    nested = root / COMPETITION / COMPETITION
    nested.mkdir(parents=True)
    for item in world["comp"].iterdir():
        (nested / item.name).symlink_to(item.resolve())
    for slug, output in notebooks.items():
        shutil.copytree(output, root / "notebooks" / USER / slug)
    return root


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_every_kernel_script_embeds_the_one_install_step(tmp_path):
    """kernel_install.py is the only copy of the install step: the templates import it (valid Python, linted), and
    the inference, prepare, training and from-folds scripts all carry its text, placeholders filled."""
    install = build.INSTALL.read_text()
    for template in (build.TEMPLATE, train_build.TRAIN_TEMPLATE):
        text = template.read_text()
        assert "def pip_install" not in text and text.count("# __INSTALL__") == 1
    cfg = _cfg()
    scripts = {
        "prepare": train_build.build_prepare_kernel(USER, tmp_path) / "kernel.py",
        "train": train_build.build_train_kernel(cfg, 0, USER, tmp_path)[0] / "kernel.py",
        "from-folds": train_build.build_infer_kernel(cfg, USER, tmp_path, folds=[0])[0] / "kernel.py",
    }
    body = install[install.index("def log(") :]  # below the placeholders: the same text in every script
    for name, path in scripts.items():
        script = path.read_text()
        assert script.count(body) == 1 and "import (  # __INSTALL__" not in script, name
        assert "from ich_kaggle.kaggle.kernel_install" not in script, name  # runs before ich_kaggle is installed
        assert f'CODE_DATASET = "{USER}/ich-kaggle-code"' in script, name
        assert not re.findall(r'"__[A-Z_]+__"', script.replace('"__main__"', "")), name
    assert 'CONFIG_NAME = "tiny"' in scripts["train"].read_text()
    with pytest.raises(RuntimeError, match="exactly one"):
        build.embed_install("print(1)\n", {})
    template = build.TEMPLATE.read_text()
    with pytest.raises(RuntimeError, match='unfilled: "__MODEL_DATASET__"'):
        build.embed_install(template, {"CONFIG_NAME": "x", "CODE_DATASET": "u/c", "ICH_KAGGLE_VERSION": "1"})


def test_launch_uses_torchrun_on_two_gpus(tmp_path):
    layout = Layout.of(tmp_path / "comp", tmp_path / "work")
    two = train_run.launch_command(tmp_path / "c.yaml", layout, tmp_path / "runs", 3, gpus=2)
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert two[-6:] == ["--work", str(layout.work), "--runs", str(tmp_path / "runs"), "--fold", "3"]
    one = train_run.launch_command(tmp_path / "c.yaml", layout, tmp_path / "runs", 3, gpus=1)
    assert one[1:4] == ["-m", "ich_kaggle", "train"]


def test_estimate_and_refusal(tmp_path):
    big = config.load("seresnext50_512")
    est = train_build.estimate(big)
    assert est.train_images == train_build.COMPETITION_TRAIN_IMAGES - est.val_images
    assert est.images == "dicom" and est.setup_hours == 0  # ~120 GB of cache cannot fit: no caching pass
    line = est.describe()
    assert "rates are ESTIMATES until measured (make kernel-gpu-check)" in line
    assert (
        f"for 3 epoch(s) x {est.train_images:,} training images at {est.train_images_per_s:.0f} img/s" in line
        and "no caching" in line
    )
    one = train_build.estimate(big, epochs=1)
    assert one.hours < est.hours / 2
    fast = train_build.estimate(big, t4_images_per_s=1000)
    assert fast.hours < 2 and "T4_IMAGES_PER_S=1000" in fast.source
    small = config.load("seresnext50_512", ["train.max_images_per_epoch=100000"])
    assert train_build.estimate(small).train_images == 100000
    with pytest.raises(
        UserError,
        match=r"^config 'seresnext50_512' starts from ImageNet weights of 'se_resnext50_32x4d' "
        r"but no attached dataset holds them .*make kernel-weights CONFIG=seresnext50_512",
    ):
        train_build.build_train_kernel(small, 2, USER, tmp_path)  # refused before anything is written
    assert not (tmp_path / "ich-kaggle-seresnext50-512-fold2").exists()
    small = config.load("seresnext50_512", ["train.max_images_per_epoch=100000", "model.pretrained=false"])
    [folder] = train_build.build_train_kernel(small, 2, USER, tmp_path)
    assert (
        folder.name == "ich-kaggle-seresnext50-512-fold2"
        and "EPOCHS_PER_RUN = None" in (folder / "kernel.py").read_text()
    )
    # a subset whose cache fits the session's disk: cached, once per session
    folds_csv = tmp_path / "folds.csv"
    folds_csv.write_text("image_id\n" + "".join(f"ID_{i}\n" for i in range(50_000)))
    subset = train_build.estimate(small, folds_csv=folds_csv)
    assert subset.images == "cache" and subset.setup_hours == pytest.approx(
        50_000 / train_build.CACHE_IMAGES_PER_S / 3600
    )
    assert "h caching the train images per session" in subset.describe()


def test_a_fold_longer_than_a_session_is_planned_across_versions(tmp_path, caplog):
    long = config.load("seresnext101_480", ["model.pretrained=false"])  # ~16 h by the documented rate: > one session
    est = train_build.estimate(long)
    limit = train_build.SESSION_LIMIT_H - train_build.SESSION_MARGIN_H
    assert est.hours > limit
    steps = train_build.plan(est, long)
    assert steps.versions == 2 and steps.epochs_per_run == 2 and est.session_hours(2) <= limit < est.session_hours(3)
    with caplog.at_level("INFO", logger="ich_kaggle"):
        [folder] = train_build.build_train_kernel(long, 1, USER, tmp_path)
    assert "EPOCHS_PER_RUN = 2" in (folder / "kernel.py").read_text()  # each version stops resumably after 2 more
    assert (
        "2 kernel versions of up to 2 epoch(s) each (EPOCHS_PER_RUN=2" in caplog.text
        and "make kernel-train fold=1 RESUME=1" in caplog.text
        and "1 more time(s)" in caplog.text
    )
    assert "\n" not in caplog.records[0].getMessage()
    by_hand = train_build.plan(est, long, epochs_per_run=1)
    assert by_hand.versions == 3 and by_hand.describe(1).startswith("as EPOCHS_PER_RUN asks: 3 kernel versions")
    with pytest.raises(UserError, match=r"cannot train EPOCHS_PER_RUN=3 epoch\(s\) within Kaggle's 12-hour session"):
        train_build.plan(est, long, epochs_per_run=3)
    slow = train_build.estimate(long, t4_images_per_s=5)  # one epoch alone is longer than a session: refused
    with pytest.raises(
        UserError,
        match=r"cannot end even one epoch .*lower train.max_images_per_epoch \(about [\d,]+ "
        r"training images per epoch fit\)",
    ) as e:
        train_build.build_train_kernel(long, 0, USER, tmp_path, t4_images_per_s=5)
    assert "\n" not in str(e.value) and not (tmp_path / "ich-kaggle-seresnext101-480-fold0").exists()
    assert slow.epoch_hours > limit


def test_push_with_the_real_kaggle_cli(tmp_path, kaggle_home):
    cfg = _cfg()
    prep = train_build.build_prepare_kernel(USER, tmp_path, k=3, seed=0)
    [folder] = train_build.build_train_kernel(cfg, 1, USER, tmp_path, resume=True)
    with FakeKaggle(max_seconds=60) as fk:
        env = fk.env()
        pushed = [
            subprocess.run(
                [str(KAGGLE), "kernels", "push", "-p", str(f)], env=env, capture_output=True, text=True, timeout=60
            )
            for f in (prep, folder)
        ]
    for result in pushed:
        assert result.returncode == 0 and "successfully pushed" in result.stdout, result.stdout + result.stderr
    prep_call, train_call = [c.json() for c in fk.calls("kernels.KernelsApiService/SaveKernel")]
    assert prep_call["slug"] == f"{USER}/ich-kaggle-prepare" and prep_call["enableGpu"] is False
    assert prep_call["competitionDataSources"] == [COMPETITION]
    assert prep_call["datasetDataSources"] == [f"{USER}/ich-kaggle-code"] and prep_call["enableInternet"] is False
    assert train_call["slug"] == f"{USER}/ich-kaggle-tiny-fold1"
    assert train_call["machineShape"] == "NvidiaTeslaT4" and train_call["enableGpu"] is True
    assert train_call["enableInternet"] is False and train_call["isPrivate"] is True
    assert train_call["competitionDataSources"] == [COMPETITION]
    assert train_call["datasetDataSources"] == [f"{USER}/ich-kaggle-code"]
    assert train_call["kernelDataSources"] == [f"{USER}/ich-kaggle-prepare", f"{USER}/ich-kaggle-tiny-fold1"]
    assert train_call["text"] == (folder / "kernel.py").read_text()
    assert "FOLD = 1" in train_call["text"] and "MODE = 'train'" in train_call["text"]


def _ich(fk: FakeKaggle, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ich_kaggle", *args, "--username", USER]
    return subprocess.run(cmd, env=fk.env(), capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_push_status_fetch(tmp_path, kaggle_home, monkeypatch, capsys):
    """`make kernel-train` through the CLI (estimate printed, pushed); prepare push, status and fetch in-process."""
    from ich_kaggle.kaggle import api

    out, runs = tmp_path / "kernels", tmp_path / "runs"
    files = {
        "runs/tiny/fold0/best.pt": b"best",
        "runs/tiny/fold0/last.pt": b"last",
        "runs/tiny/fold0/oof.csv": b"x",
        "runs/tiny/fold0/ich_kaggle_fold.json": json.dumps(
            {"config": "tiny", "fold": 0, "done": True, "files": ["best.pt", "last.pt", "oof.csv"]}
        ).encode(),
    }
    with FakeKaggle(max_seconds=90, kernel_statuses=["RUNNING"], kernel_output=files) as fk:
        pushed = _ich(
            fk,
            "kernel-train",
            "--config",
            "tiny",
            "--set",
            *OVERRIDES,
            "--fold",
            "0",
            "--out",
            str(out),
            "--push",
            "--data",
            str(tmp_path / "nodata"),
        )
        for key, value in fk.env({}).items():
            monkeypatch.setenv(key, value)
        for key in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(key, raising=False)
        api.push_kernel(train_build.build_prepare_kernel(USER, out, k=3, seed=0))
        states = train_build.kernel_states(out, USER)
        dest = train_build.fetch_fold("tiny", 0, USER, runs=runs, out=out)
        fk.kernel_output.clear()
        fk.kernel_output.update(
            {
                "meta.csv": b"image_id\n",
                "folds.csv": b"image_id,patient_id,study_id,series_id,fold\n",
                "folds.csv.json": b'{"k": 3, "seed": 0}',
                "ich_kaggle_prepare.json": b"{}",
            }
        )
        work = train_build.fetch_prepared(USER, Layout.of(tmp_path / "data", tmp_path / "work"), out=out)
        fk.kernel_output.clear()
        with pytest.raises(UserError, match="no runs/tiny/fold1/ich_kaggle_fold.json in the kernel's output"):
            train_build.fetch_fold("tiny", 1, USER, runs=runs, out=out)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "estimated wall time on T4 x2" in pushed.stdout and "version 1" in pushed.stdout
    bodies = [c.json() for c in fk.calls("kernels.KernelsApiService/SaveKernel")]
    assert [b["slug"] for b in bodies] == [f"{USER}/ich-kaggle-tiny-fold0", f"{USER}/ich-kaggle-prepare"]
    assert bodies[0]["machineShape"] == "NvidiaTeslaT4"
    assert states == {f"{USER}/ich-kaggle-prepare": "running", f"{USER}/ich-kaggle-tiny-fold0": "running"}
    assert dest == runs / "tiny" / "fold0" and (dest / "best.pt").read_bytes() == b"best"
    assert (dest / train_run.FOLD_MANIFEST).is_file() and "finished" in capsys.readouterr().out
    assert (work / "folds.csv").read_bytes() == b"image_id,patient_id,study_id,series_id,fold\n"
    assert (work / "folds.csv").stat().st_mtime > (work / "meta.csv").stat().st_mtime  # not rebuilt as stale


def _meta_rows(layout: Layout, n: int) -> None:
    layout.work.mkdir(parents=True)
    rows = "\n".join(f"ID_{i},P,S,R,train,stage_2_train/ID_{i}.dcm,1.0,0,1" for i in range(n))
    layout.meta_csv.write_text(
        "image_id,patient_id,study_id,series_id,split,path,z,slice_rank,series_len\n" + rows + "\n"
    )


def test_the_cache_where_it_fits_else_the_dicoms_with_the_figures(tmp_path, monkeypatch, caplog):
    layout = Layout.of(tmp_path / "comp", tmp_path / "work")
    _meta_rows(layout, 1000)
    cfg = _cfg()
    monkeypatch.setattr(train_run, "scratch_free_bytes", lambda p: 10**9)
    with caplog.at_level("INFO", logger="ich_kaggle"):
        assert train_run.choose_source(layout, cfg) == "cache"  # 240 MB fits
        monkeypatch.setattr(train_run, "scratch_free_bytes", lambda p: 10**6)
        assert train_run.choose_source(layout, cfg) == "dicom"
        assert train_run.choose_source(layout, config.load("tiny", OVERRIDES + ["data.source=dicom"])) == "dicom"
    assert "caching 1,000 train images (about 0.2 GB of the 1.0 GB free" in caplog.text
    assert (
        f"caching 1,000 train images would need about 0.2 GB but {layout.work} has 0.0 GB free; reading every "
        f"slice from its DICOM"
    ) in caplog.text
    assert "data.source=dicom in the config" in caplog.text


@pytest.mark.slow
def test_training_kernel_without_room_for_the_cache_trains_from_the_dicoms(world, tmp_path, monkeypatch, caplog):
    """The training kernel's run on the fake /kaggle/input, its scratch disk too small for the cache: it trains
    from the DICOMs instead of stopping, caches nothing, says so, and its fold is the local fold from the cache."""
    from ich_kaggle import train

    cfg = _cfg()
    local = Layout.of(world["comp"], tmp_path / "work_local")
    local_fold = train.train_fold(cfg, local, 0, runs=tmp_path / "runs_local")
    prepared = train_run.run_prepare(world["comp"], tmp_path / "prepared", k=cfg.cv.k, seed=cfg.cv.seed, workers=1)
    root = _input(tmp_path / "input", world, {"ich-kaggle-prepare": prepared})
    monkeypatch.setattr(train_run, "scratch_free_bytes", lambda p: 10**5)  # 100 kB free: not even one slice
    monkeypatch.delenv("ICH_STOP_AFTER_EPOCHS", raising=False)
    monkeypatch.chdir(ROOT)  # the training process runs `python -m ich_kaggle` from here
    inputs = train_run.find_train_inputs(root, cfg.name, 0)
    scratch = tmp_path / "scratch"
    with caplog.at_level("INFO", logger="ich_kaggle"):
        fold = train_run.run_training(cfg, 0, inputs, tmp_path / "working", scratch, gpus=0)
    assert "reading every slice from its DICOM" in caplog.text
    assert not (scratch / "work" / "cache").exists()
    assert "images from their DICOMs under" in fold.train_log.read_text()
    manifest = json.loads((fold.dir / train_run.FOLD_MANIFEST).read_text())
    assert manifest["images"] == "dicom" and manifest["done"] is True
    assert config.load(str(fold.config)).data.source == "dicom"
    _same_weights(fold.last, Path(local_fold) / "last.pt")
    assert fold.oof.read_bytes() == (Path(local_fold) / "oof.csv").read_bytes()


def test_find_train_inputs_and_epochs_done(tmp_path):
    root = tmp_path / "input"
    comp = root / COMPETITION / COMPETITION
    (comp / "stage_2_train").mkdir(parents=True)
    (comp / "stage_2_train.csv").write_text("ID,Label\n")
    with pytest.raises(UserError, match="no ich_kaggle_prepare.json under .*make kernel-prepare"):
        train_run.find_train_inputs(root, "tiny", 0)
    prep = root / "notebooks" / USER / "ich-kaggle-prepare"
    prep.mkdir(parents=True)
    (prep / train_run.PREPARE_MANIFEST).write_text("{}")
    assert train_run.find_train_inputs(root, "tiny", 0) == train_run.TrainInputs(comp, prep, None)
    previous = root / "notebooks" / USER / "ich-kaggle-tiny-fold0" / "runs" / "tiny" / "fold0"
    other = root / "notebooks" / USER / "ich-kaggle-tiny-fold1" / "runs" / "tiny" / "fold1"
    for d in (previous, other):
        d.mkdir(parents=True)
        (d / "last.pt").write_bytes(b"")
    assert train_run.find_train_inputs(root, "tiny", 0).previous == previous  # depth 6 under the root, its own fold
    fold = Run.of(tmp_path / "runs", "tiny").fold(0)
    assert train_run.epochs_done(fold) == 0
    fold.dir.mkdir(parents=True)
    fold.log_csv.write_text("epoch,lr\n1,0.1\n2,0.1\n")
    assert train_run.epochs_done(fold) == 2  # with EPOCHS_PER_RUN=1 the next version stops after epoch 3
    cfg = _cfg()
    with pytest.raises(
        UserError, match=r"k=5, seed=42 but config 'tiny' wants cv.k=3, cv.seed=0; rerun make kernel-prepare K=3 SEED=0"
    ):
        for name, text in (
            ("meta.csv", "image_id\n"),
            ("folds.csv", "image_id\n"),
            ("folds.csv.json", '{"k": 5, "seed": 42}'),
        ):
            (prep / name).write_text(text)
        train_run.install_prepared(prep, Layout.of(comp, tmp_path / "work"), cfg)


def test_kaggle_plan_of_the_recipes_and_measured_rates(tmp_path, monkeypatch):
    """`make kaggle-plan`: kaggle_week fits a week of free quota by the planner, seresnext_pair does not and its
    inference is split by member; a measured rates file replaces the estimates and says so."""
    from ich_kaggle.core import ensemble
    from ich_kaggle.kaggle import plan, rates

    monkeypatch.setenv(rates.RATES_ENV, str(tmp_path / "kaggle_rates.yaml"))

    def made(name):
        cfg = config.load(name)
        return plan.make_plan(cfg, ensemble.load_members(cfg) if cfg.is_ensemble else [cfg])

    week, pair = made("kaggle_week"), made("seresnext_pair")
    assert week.total_hours <= plan.WEEKLY_GPU_HOURS and len(week.inference) == 1 and not week.measured
    assert len(week.folds) == 10 and all(f.sessions == 1 for f in week.folds)
    assert pair.total_hours > 4 * plan.WEEKLY_GPU_HOURS and [k.members for k in pair.inference] == [
        ["seresnext50_512"],
        ["seresnext101_480"],
    ]
    assert {f.sessions for f in pair.folds if f.member == "seresnext101_480"} == {2}
    lines = week.lines(12.5)
    assert "ESTIMATES" in lines[-2] and "quota: 12.5 h of GPU left this week: the plan does not fit" in lines[-1]
    assert any(
        "infer seresnext50_256+seresnext101_256 folds [0, 1, 2, 3, 4]: 121,232 slices x 2 member(s) x 5 "
        "fold(s) x 3 view(s)" in line
        for line in lines
    )
    (tmp_path / "kaggle_rates.yaml").write_text(
        yaml.safe_dump(
            {
                "se_resnext50_32x4d": {256: {"train": 232.0, "infer": 696.0}},
                "se_resnext101_32x4d": {256: {"train": 136.0, "infer": 408.0}},
            }
        )
    )
    measured = made("kaggle_week")
    assert measured.measured and "ESTIMATES" not in "\n".join(measured.lines())
    assert measured.training_hours == pytest.approx(week.training_hours / 2, rel=0.01)  # twice the rate


def test_ensemble_kernels_per_member_and_split_inference(tmp_path, caplog):
    """An ensemble trains one kernel per member and fold; its inference, too long for one session, is one kernel
    per member, combined locally (make kernel-combine) as the ensemble combines."""
    from ich_kaggle.core.labels import LABELS

    from ich_kaggle.core import ensemble

    pair = config.load("seresnext_pair")
    members = ensemble.load_members(pair, ["model.pretrained=false"])
    with pytest.raises(UserError, match="config 'seresnext50_512' starts from ImageNet weights"):
        train_build.build_train_kernel(pair, 3, USER, tmp_path)  # the members' weights are not in a dataset
    folders = train_build.build_train_kernel(pair, 3, USER, tmp_path, members=members)
    assert [f.name for f in folders] == ["ich-kaggle-seresnext50-512-fold3", "ich-kaggle-seresnext101-480-fold3"]
    assert 'CONFIG_NAME = "seresnext101_480"' in (folders[1] / "kernel.py").read_text()
    assert json.loads((folders[0] / "kernel-metadata.json").read_text())["docker_image_pinning_type"] == "original"
    with caplog.at_level("INFO", logger="ich_kaggle"):
        infer = train_build.build_infer_kernel(pair, USER, tmp_path, members=members)
    assert [f.name for f in infer] == [
        "ich-kaggle-seresnext50-512-from-folds",
        "ich-kaggle-seresnext101-480-from-folds",
    ]
    sources = json.loads((infer[1] / "kernel-metadata.json").read_text())["kernel_sources"]
    assert sources == [f"{USER}/ich-kaggle-prepare"] + [f"{USER}/ich-kaggle-seresnext101-480-fold{k}" for k in range(5)]
    assert "make kernel-combine CONFIG=seresnext_pair" in caplog.text
    probs = {"seresnext50_512": 0.2, "seresnext101_480": 0.4}
    for name, p in probs.items():
        dest = tmp_path / "output" / train_build.infer_slug(name)
        dest.mkdir(parents=True)
        (dest / "submission.csv").write_text(
            "ID,Label\n"
            + "".join(f"ID_{i}_{label},{p if label == 'any' else 0.1:.6f}\n" for i in ("a1", "b2") for label in LABELS)
        )
    combined = train_build.combine_outputs(pair, USER, tmp_path, fetch=False)
    text = combined.read_text().splitlines()
    assert text[0] == "ID,Label" and len(text) == 13 and "ID_a1_any,0.300000" in text  # the mean of probabilities


def test_every_invalid_source_field_refuses_the_push(tmp_path, kaggle_home, monkeypatch):
    """Kaggle accepts a kernel whose sources it cannot attach and says so only in invalid*Sources: each is a
    one-line refusal (the CLI exits 0)."""
    from types import SimpleNamespace

    from ich_kaggle.kaggle import api

    folder = train_build.build_prepare_kernel(USER, tmp_path)
    for kind in api.SOURCE_KINDS:
        answer = SimpleNamespace(
            error=None,
            status=None,
            ref="r",
            url="u",
            versionNumber=1,
            **{f"invalid_{k}_sources": [f"{USER}/x"] if k == kind else [] for k in api.SOURCE_KINDS},
        )
        monkeypatch.setattr(api, "client", lambda: SimpleNamespace(kernels_push=lambda path: answer))
        with pytest.raises(UserError, match=rf"without its {kind} sources \['{USER}/x'\]") as e:
            api.push_kernel(folder)
        assert "\n" not in str(e.value)
