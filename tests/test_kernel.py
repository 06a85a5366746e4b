"""Offline Kaggle kernel: metadata checks, dataset folders, the real `kaggle` CLI against a fake API server, and
(slow) the kernel script run in a fresh virtual environment against a fake /kaggle/input tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ich_kaggle.core.layout import COMPETITION
from ich_kaggle import bundle
from ich_kaggle.core import config
from ich_kaggle.kaggle import build as kernel, run as kernel_run, wheels
from types import SimpleNamespace
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.layout import Layout

sys.path.insert(0, str(Path(__file__).parent))
from fake_kaggle import FakeKaggle  # noqa: E402
import train_helpers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the `kaggle` CLI installed beside the interpreter running the tests (whatever the environment is called)
KAGGLE = Path(sys.executable).parent / "kaggle"


@pytest.fixture
def cfg():
    return config.load("tiny")


TINY_SET = [*train_helpers.PAIR_SETTINGS, *train_helpers.PAIR_MEMBER_SET]  # the experiment of conftest's `tiny_exp`


@pytest.fixture(scope="module")
def model_dataset(tiny_exp, tmp_path_factory) -> SimpleNamespace:
    """`make kernel-datasets`'s model dataset (the model bundle + dataset-metadata.json) of the session's tiny
    experiment (trained, predicted, submitted and exported by `tiny_exp`), for user testuser."""
    cfg = config.load("tiny", tiny_exp.settings)
    layout = Layout.of(tiny_exp.comp, tiny_exp.work)
    out = tmp_path_factory.mktemp("model") / "kernels"
    names = kernel.names_for(cfg, "testuser")
    folder = kernel.build_model_dataset(cfg, names, tiny_exp.runs, out, layout)
    return SimpleNamespace(cfg=cfg, runs=tiny_exp.runs, layout=layout, folder=folder, names=names, exp=tiny_exp)


def _with_model(model_dataset, out: Path) -> Path:
    """A copy of the model dataset folder under `out` (where build_kernel looks for it)."""
    dest = out / model_dataset.folder.name
    shutil.copytree(model_dataset.folder, dest)
    return dest


def fake_layout(base: Path) -> Layout:
    """meta.csv / folds.csv of the data the fake run was trained on (the stacker's inputs)."""
    layout = Layout.of(base / "comp", base / "work")
    layout.work.mkdir(parents=True)
    layout.meta_csv.write_text(
        "image_id,patient_id,study_id,series_id,split,path,z,slice_rank,series_len\n"
        "ID_a,P1,S1,R1,train,stage_2_train/ID_a.dcm,1.0,0,1\n"
        "ID_t,P2,S2,R2,test,stage_2_test/ID_t.dcm,1.0,0,1\n"
    )
    layout.folds_csv.write_text("image_id,patient_id,study_id,series_id,fold,any\nID_a,P1,S1,R1,0,1\n")
    layout.folds_csv.with_name("folds.csv.json").write_text('{"k": 5, "seed": 42, "images": 1}')
    return layout


# --- names and metadata errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "slug, words",
    [
        ("ich", "3 characters"),
        ("a" * 51, "51 characters"),
        ("ICH-kernel", "lower-case"),
        ("ich_kernel", "lower-case"),
        ("ich--kernel", "single hyphens"),
        ("-ichkernel", "lower-case"),
        ("ich kernel", "lower-case"),
    ],
)
def test_bad_slug_is_one_line_user_error(slug, words):
    with pytest.raises(UserError) as e:
        kernel.check_slug(slug)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert "SLUG=" in str(e.value)  # says how to fix it


def test_good_slug_and_title_round_trip():
    for slug in ("ich-kaggle-seresnext50-512", "abcde", "x1-y2-z3"):
        assert kernel.check_slug(slug) == slug
        assert kernel.slugify(kernel.title_for(slug)) == slug  # Kaggle renames kernels whose title does not match


@pytest.mark.parametrize("username", [None, "", "  ", "bad user", "me/you"])
def test_missing_or_bad_username(username, cfg):
    with pytest.raises(UserError, match="KAGGLE_USERNAME"):
        kernel.names_for(cfg, username)


def test_names_and_default_slug(cfg):
    big = config.load("seresnext50_512")
    names = kernel.names_for(big, "alice")
    assert names.kernel_slug == "ich-kaggle-seresnext50-512"
    assert names.model_id == "alice/ich-kaggle-model-seresnext50-512"
    assert names.code_id == "alice/ich-kaggle-code"
    assert kernel.names_for(cfg, "alice", "my-kernel").kernel_id == "alice/my-kernel"
    cfg.name = "x" * 40  # ich-kaggle-model-xxxx... exceeds Kaggle's 50 characters
    with pytest.raises(UserError, match="model dataset slug .* shorter name"):
        kernel.names_for(cfg, "alice", "short-slug")


def test_no_trained_fold(tmp_path, cfg):
    (tmp_path / "runs" / cfg.name / "fold0").mkdir(parents=True)  # a fold folder without best.pt
    with pytest.raises(UserError, match="no finished fold") as e:
        kernel.build_datasets(
            cfg, runs=tmp_path / "runs", out=tmp_path / "kernels", username="alice", layout=fake_layout(tmp_path)
        )
    assert "make train-all CONFIG=tiny" in str(e.value)
    assert not (tmp_path / "kernels").exists()  # nothing half-written


def test_kernel_needs_the_dataset_folders(tmp_path, model_dataset, monkeypatch):
    cfg, runs = model_dataset.cfg, model_dataset.runs
    out = tmp_path / "kernels"
    with pytest.raises(UserError, match="ich-kaggle-code is missing") as e:
        kernel.build_kernel(cfg, runs=runs, out=out, username="testuser")
    assert "make kernel-datasets CONFIG=tiny KAGGLE_USERNAME=testuser" in str(e.value)
    names = kernel.names_for(cfg, "testuser")

    def empty_wheel(dest: Path) -> wheels.Wheel:  # the wheel's contents do not matter here; building it is slow
        (dest / "ich_kaggle-0.1.0-py3-none-any.whl").write_bytes(b"")
        return wheels.Wheel(dest / "ich_kaggle-0.1.0-py3-none-any.whl", "ich_kaggle", "0.1.0", "built")

    monkeypatch.setattr(wheels, "build_project_wheel", empty_wheel)
    kernel.build_code_dataset(names, out, packages=())
    with pytest.raises(UserError, match="ich-kaggle-model-tiny is missing"):
        kernel.build_kernel(cfg, runs=runs, out=out, username="testuser")
    with pytest.raises(UserError, match="needs the data folder .* DATA_DIR=<folder>"):
        kernel.build_model_dataset(cfg, names, runs, out)  # no layout: the bundle chooses its stage by the labels
    model = _with_model(model_dataset, out)
    with pytest.raises(UserError, match="has id 'testuser/ich-kaggle-code', expected 'bob/ich-kaggle-code'"):
        kernel.build_kernel(cfg, runs=runs, out=out, username="bob")  # datasets built for another user
    (model / "members" / "tiny" / "fold0.pt").unlink()
    with pytest.raises(UserError, match="1 file\\(s\\) missing: members/tiny/fold0.pt"):
        kernel.build_kernel(cfg, runs=runs, out=out, username="testuser")
    assert not (out / "ich-kaggle-tiny").exists()


def test_cli_prints_one_line_error(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "ich_kaggle",
        "kernel",
        "--config",
        "tiny",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "kernels"),
        "--slug",
        "ich",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**_env(), "KAGGLE_USERNAME": "alice"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: kernel slug 'ich' has 3 characters; Kaggle needs 5 to 50 (pass --slug / make kernel SLUG=<name>)"
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KAGGLE_USERNAME", "PYTHONPATH")}
    return env


# --- dataset and kernel folders -----------------------------------------------------------------------------------
def test_model_dataset_is_the_bundle(model_dataset, tmp_path):
    folder = model_dataset.folder
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == [
        "bundle.json",
        "config.yaml",
        "dataset-metadata.json",
        "members/tiny/config.yaml",
        "members/tiny/fold0.pt",
        "members/tiny/fold1.pt",
    ]  # no OOF or test predictions, no optimizer state: what `make export` writes, and Kaggle's metadata
    b = bundle.load(folder)  # the checksums hold: dataset-metadata.json is beside the bundle, not in it
    assert [(m["name"], m["folds"]) for m in b.info["members"]] == [("tiny", [0, 1])]
    meta = json.loads((folder / "dataset-metadata.json").read_text())
    assert meta["id"] == "testuser/ich-kaggle-model-tiny" and meta["licenses"] == [{"name": "CC0-1.0"}]
    assert 6 <= len(meta["title"]) <= 50
    assert config.load(str(folder / "config.yaml")).to_dict() == model_dataset.cfg.to_dict()
    # the same files as `make export` (one writer): the bundle of conftest's fixture
    exported = model_dataset.exp.bundle
    assert all((folder / n).read_bytes() == (exported / n).read_bytes() for n in b.info["files"] if n.endswith(".yaml"))
    assert set(b.info["files"]) == set(bundle.load(exported).info["files"])  # (torch.save's bytes vary by run)
    # an old-format model dataset folder (ich_kaggle_model.json) is replaced, not mixed in
    old = tmp_path / "kernels" / folder.name
    old.mkdir(parents=True)
    (old / "ich_kaggle_model.json").write_text("{}")
    (old / "fold0_best.pt").write_bytes(b"old")
    kernel.build_model_dataset(
        model_dataset.cfg, model_dataset.names, model_dataset.runs, tmp_path / "kernels", model_dataset.layout
    )
    assert not (old / "fold0_best.pt").exists() and (old / "bundle.json").is_file()


def test_repacked_wheel_installs_and_imports(tmp_path):
    wheel = wheels.repack_installed("munch", tmp_path / "w")
    assert wheel.pure and wheel.path.name == "munch-4.0.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel.path) as zf:
        names = zf.namelist()
        record = zf.read("munch-4.0.0.dist-info/RECORD").decode()
    assert "munch/__init__.py" in names and not any("__pycache__" in n for n in names)
    assert "munch/__init__.py,sha256=" in record
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--quiet",
            "--target",
            str(target),
            str(wheel.path),
        ],
        check=True,
    )  # pip checks every RECORD hash
    out = subprocess.run(
        [sys.executable, "-c", "import munch; print(munch.__file__)"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target)},
        check=True,
    )
    assert out.stdout.startswith(str(target))


def test_code_dataset_and_kernel_folder(tmp_path, model_dataset, monkeypatch):
    cfg, runs = model_dataset.cfg, model_dataset.runs
    out = tmp_path / "kernels"
    names = kernel.names_for(cfg, "testuser")
    (out / "ich-kaggle-code").mkdir(parents=True)
    (out / "ich-kaggle-code" / "ich_kaggle-0.0.1-py3-none-any.whl").write_bytes(b"stale")  # replaced, not mixed in
    code = kernel.build_code_dataset(names, out, packages=("munch",))
    assert sorted(p.name for p in code.glob("*.whl")) == [
        "ich_kaggle-0.1.0-py3-none-any.whl",
        "munch-4.0.0-py2.py3-none-any.whl",
    ]
    with zipfile.ZipFile(code / "ich_kaggle-0.1.0-py3-none-any.whl") as zf:
        packed = zf.namelist()
    assert {"ich_kaggle/kaggle/run.py", "ich_kaggle/kaggle/template.py", "ich_kaggle/configs/tiny.yaml"} <= set(packed)
    assert not (ROOT / "build").exists() or not any((ROOT / "build").iterdir())  # built from a copy
    _with_model(model_dataset, out)

    folder = kernel.build_kernel(cfg, runs=runs, out=out, username="testuser")
    assert folder == out / "ich-kaggle-tiny"
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["id"] == "testuser/ich-kaggle-tiny" and meta["code_file"] == "kernel.py"
    assert meta["language"] == "python" and meta["kernel_type"] == "script"
    assert meta["enable_internet"] is False and meta["enable_gpu"] is True and meta["is_private"] is True
    assert meta["machine_shape"] == "NvidiaTeslaT4"  # else a CLI push gets a P100, which Kaggle's torch cannot run
    assert meta["competition_sources"] == [COMPETITION]
    assert meta["dataset_sources"] == ["testuser/ich-kaggle-code", "testuser/ich-kaggle-model-tiny"]
    assert meta["kernel_sources"] == []
    script = (folder / "kernel.py").read_text()
    compile(script, "kernel.py", "exec")
    assert 'CONFIG_NAME = "tiny"' in script and 'MODEL_DATASET = "testuser/ich-kaggle-model-tiny"' in script
    assert "__CONFIG_NAME__" not in script and "--no-index" in script
    assert "PART = {'members': None, 'folds': None}" in script

    # a part kernel (make kernel FOLDS=1): its own slug, its selection in the script; a resumed one attaches itself
    part = kernel.build_kernel(cfg, runs=runs, out=out, username="testuser", folds=[1], resume=True)
    assert part.name == "ich-kaggle-tiny-f1"
    assert "PART = {'members': None, 'folds': [1]}" in (part / "kernel.py").read_text()
    assert json.loads((part / "kernel-metadata.json").read_text())["kernel_sources"] == ["testuser/ich-kaggle-tiny-f1"]
    last = kernel.build_kernel(cfg, runs=runs, out=out, username="testuser", attach=["ich-kaggle-tiny-f1"])
    assert json.loads((last / "kernel-metadata.json").read_text())["kernel_sources"] == ["testuser/ich-kaggle-tiny-f1"]
    with pytest.raises(UserError, match="FOLDS \\[4\\] are not all in"):
        kernel.build_kernel(cfg, runs=runs, out=out, username="testuser", folds=[4])
    # an inference longer than a session (the plan's rule, sessions.split_inference): refused, naming the parts
    from ich_kaggle.kaggle import sessions

    monkeypatch.setattr(sessions, "inference_hours", lambda member, folds: 6.0 * folds)
    monkeypatch.setattr(sessions, "inference_setup_hours", lambda: 0.1)
    with pytest.raises(UserError, match="needs 12.2 h, more than one 12-hour session") as e:
        kernel.build_kernel(cfg, runs=runs, out=out, username="testuser")
    assert 'FOLDS="0" SLUG=ich-kaggle-tiny-m0-f0' in str(e.value) and "\n" not in str(e.value)
    assert 'ATTACH="ich-kaggle-tiny-m0-f0 ich-kaggle-tiny-m0-f1"' in str(e.value)
    assert kernel.build_kernel(cfg, runs=runs, out=out, username="testuser", members=["tiny"], folds=[0]).is_dir()
    kernel.build_kernel(cfg, runs=runs, out=out, username="testuser", attach=["ich-kaggle-tiny-m0-f0"])  # the last


def test_find_bundle_in_nested_kaggle_layout(tmp_path):
    root = tmp_path / "input"
    comp = root / "competitions" / COMPETITION / COMPETITION  # today's kernels mount competitions two levels deeper
    (comp / "stage_2_test").mkdir(parents=True)
    (comp / "stage_2_train").mkdir()
    (comp / "stage_2_sample_submission.csv").write_text("ID,Label\n")
    model = root / "datasets" / "alice" / "ich-kaggle-model-tiny"
    model.mkdir(parents=True)
    (model / "bundle.json").write_text(json.dumps({"name": "tiny"}))
    other = root / "datasets" / "bob" / "ich-kaggle-model-big" / "sub"
    other.mkdir(parents=True)
    (other / "bundle.json").write_text(json.dumps({"name": "big"}))
    assert kernel_run.find_bundle(root, "tiny") == model and kernel_run.find_bundle(root, "big") == other
    assert kernel_run.find_test_competition(root) == comp
    with pytest.raises(UserError, match="attach ich-kaggle-model-other"):
        kernel_run.find_bundle(root, "other")
    (comp / "stage_2_sample_submission.csv").unlink()
    with pytest.raises(UserError, match="add the competition"):
        kernel_run.find_test_competition(root)
    assert kernel_run.find_previous(root) == []


# --- the real kaggle CLI against a fake API server ----------------------------------------------------------------
def _kaggle(fk: FakeKaggle, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(KAGGLE), *args], env=fk.env(), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_dataset):
    """Kernel + both datasets of the tiny experiment, owned by the fake credentials' user (built once per module)."""
    cfg = model_dataset.cfg
    tmp_path = tmp_path_factory.mktemp("built")
    shutil.copytree(model_dataset.runs, tmp_path / "runs")  # test_stale_model_dataset_warns retrains a fold
    out = tmp_path / "kernels"
    names = kernel.names_for(cfg, "testuser")
    kernel.build_code_dataset(names, out, packages=("munch",))
    _with_model(model_dataset, out)
    kernel.build_kernel(cfg, runs=tmp_path / "runs", out=out, username="testuser")
    return names, out


def test_kaggle_kernels_push(built, kaggle_home):
    names, out = built
    with FakeKaggle(max_seconds=60) as fk:
        result = _kaggle(fk, "kernels", "push", "-p", str(names.kernel_dir(out)))
    assert result.returncode == 0, result.stderr
    assert "Kernel version 1 successfully pushed" in result.stdout
    (call,) = fk.calls("kernels.KernelsApiService/SaveKernel")
    body = call.json()
    assert body["slug"] == "testuser/ich-kaggle-tiny"
    assert body["newTitle"] == "ICH kaggle tiny"
    assert body["text"] == (names.kernel_dir(out) / "kernel.py").read_text()
    assert body["language"] == "python" and body["kernelType"] == "script"
    assert body["enableInternet"] is False and body["enableGpu"] is True and body["isPrivate"] is True
    assert body["machineShape"] == "NvidiaTeslaT4"  # what the server sees: T4 x2, not the P100 default
    assert body["competitionDataSources"] == [COMPETITION]
    assert body["datasetDataSources"] == ["testuser/ich-kaggle-code", "testuser/ich-kaggle-model-tiny"]
    assert call.headers.get("Authorization", "").startswith("Basic ")  # KAGGLE_USERNAME/KAGGLE_KEY were used


def test_kaggle_kernels_push_error_is_printed(built, kaggle_home):
    names, out = built
    with FakeKaggle(max_seconds=60, kernel_error="Notebook not found") as fk:
        result = _kaggle(fk, "kernels", "push", "-p", str(names.kernel_dir(out)))
    assert result.returncode == 0  # the CLI does not fail on an error field: read its output
    assert "Kernel push error: Notebook not found" in result.stdout
    assert len(fk.calls("kernels.KernelsApiService/SaveKernel")) == 1


def test_kaggle_datasets_create_and_version(built, kaggle_home, tmp_path):
    names, out = built
    code, model = names.code_dir(out), names.model_dir(out)
    with FakeKaggle(max_seconds=60) as fk:
        first = _kaggle(fk, "datasets", "create", "-p", str(code), "--dir-mode", "zip")
        second = _kaggle(fk, "datasets", "create", "-p", str(model), "--dir-mode", "zip")
        again = _kaggle(fk, "datasets", "version", "-p", str(model), "-m", "new folds", "--dir-mode", "zip")
    for result in (first, second, again):
        assert result.returncode == 0, result.stderr
    assert "Your private Dataset is being created" in first.stdout and "Dataset creation error" not in second.stdout
    assert "Dataset version is being created" in again.stdout
    creates = [c.json() for c in fk.calls("datasets.DatasetApiService/CreateDataset")]
    assert [(c["ownerSlug"], c["slug"]) for c in creates] == [
        ("testuser", "ich-kaggle-code"),
        ("testuser", "ich-kaggle-model-tiny"),
    ]
    assert all(c["isPrivate"] and c["licenseName"] == "CC0-1.0" for c in creates)
    # every file went up as a blob whose bytes arrived intact, and the create request lists each blob's token
    uploaded = {fk.blob_names[c["token"]]: fk.uploads[c["token"]] for c in creates[0]["files"]}
    assert set(uploaded) == {p.name for p in code.iterdir() if p.name != "dataset-metadata.json"}
    assert uploaded["munch-4.0.0-py2.py3-none-any.whl"] == (code / "munch-4.0.0-py2.py3-none-any.whl").read_bytes()
    model_blobs = {fk.blob_names[c["token"]] for c in creates[1]["files"]}
    assert {"bundle.json", "config.yaml", "members.zip"} <= model_blobs  # sub-folders go up zipped, Kaggle unpacks them
    (version,) = [c.json() for c in fk.calls("datasets.DatasetApiService/CreateDatasetVersion")]
    assert version["datasetSlug"] == "ich-kaggle-model-tiny" and version["body"]["versionNotes"] == "new folds"
    # what a kernel mounts: the uploaded files, each sub-folder's archive unpacked as Kaggle does: the bundle whole
    mounted = fk.dataset_files(names.model_id, tmp_path / "mounted")

    def tree(folder: Path) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    assert tree(mounted) == [n for n in tree(model) if n != "dataset-metadata.json"]
    assert any("/" in n for n in tree(mounted))  # the members' sub-folders came through the archives
    assert bundle.load(mounted).info == bundle.load(model).info  # every file present, every checksum right


# --- `python -m ich_kaggle <step>`: every Kaggle call checks the answer (the CLI exits 0 on a refusal) -----------
def _ich(fk: FakeKaggle, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ich_kaggle", *args, "--config", "tiny", "--out", str(out), "--username", "testuser"]
    return subprocess.run(cmd, env=fk.env(), capture_output=True, text=True, timeout=120, cwd=ROOT)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # no traceback
    return lines[0]


def test_refused_kernel_push_exits_nonzero_with_kaggles_message(built, kaggle_home):
    names, out = built
    with FakeKaggle(max_seconds=60, kernel_error="Notebook not found") as fk:
        refused = _ich(fk, out, "kernel-push")
    assert "Kaggle refused the kernel" in _one_line_error(refused) and "Notebook not found" in refused.stderr
    with FakeKaggle(max_seconds=60) as fk:
        ok = _ich(fk, out, "kernel-push")
    assert ok.returncode == 0, ok.stderr
    assert "version 1: http://localhost/code/testuser/ich-kaggle-tiny" in ok.stdout
    (call,) = fk.calls("kernels.KernelsApiService/SaveKernel")
    assert call.json()["machineShape"] == "NvidiaTeslaT4"


def test_refused_datasets_exit_nonzero(built, kaggle_home):
    names, out = built
    with FakeKaggle(max_seconds=60, existing_datasets={"testuser/ich-kaggle-code"}) as fk:
        exists = _ich(fk, out, "datasets-create")
    line = _one_line_error(exists)
    assert "testuser/ich-kaggle-code already exists" in line and "make datasets-version" in line
    (created,) = [c.json()["slug"] for c in fk.calls("datasets.DatasetApiService/CreateDataset")]
    assert created == "ich-kaggle-model-tiny"  # the missing one is created: datasets-version then finds both
    verify = "Phone verification is required to create datasets"
    with FakeKaggle(max_seconds=60, dataset_error=verify) as fk:
        refused = _ich(fk, out, "datasets-create")
        fk.existing_datasets.update({names.code_id, names.model_id})
        refused_version = _ich(fk, out, "datasets-version")
    assert (
        verify in _one_line_error(refused)
        and "Kaggle refused to create dataset testuser/ich-kaggle-code" in refused.stderr
    )
    assert verify in _one_line_error(refused_version)
    with FakeKaggle(max_seconds=60) as fk:
        missing = _ich(fk, out, "datasets-version")
    assert "does not exist on Kaggle yet" in _one_line_error(missing) and "datasets-create" in missing.stderr


def test_datasets_create_wait_version(built, kaggle_home):
    names, out = built
    with FakeKaggle(max_seconds=60) as fk:
        created = _ich(fk, out, "datasets-create")
        fk.dataset_polls[names.model_id] = ["BLOBS_RECEIVED", "BLOBS_DECOMPRESSED"]  # Kaggle still processing
        waited = _ich(fk, out, "datasets-wait", "--poll", "0.05")
        fk.dataset_polls[names.code_id] = ["FAILED"]
        failed = _ich(fk, out, "datasets-wait", "--poll", "0.05")
        version = _ich(fk, out, "datasets-version")
    for result in (created, waited, version):
        assert result.returncode == 0, result.stderr
    assert [(c.json()["slug"]) for c in fk.calls("datasets.DatasetApiService/CreateDataset")] == [
        "ich-kaggle-code",
        "ich-kaggle-model-tiny",
    ]
    assert "dataset testuser/ich-kaggle-model-tiny: ready" in waited.stdout
    polls = [c.json()["datasetSlug"] for c in fk.calls("datasets.DatasetApiService/GetDatasetStatus")]
    assert polls.count("ich-kaggle-model-tiny") >= 4  # create's check, then polled until READY
    assert "is failed on Kaggle" in _one_line_error(failed)
    notes = [c.json()["body"]["versionNotes"] for c in fk.calls("datasets.DatasetApiService/CreateDatasetVersion")]
    assert notes == ["ich_kaggle tiny", "ich_kaggle tiny"]


@pytest.mark.slow
def test_kernel_wait_output_submit(built, kaggle_home):
    names, out = built
    from ich_kaggle.core.labels import LABELS

    sub = ("ID,Label\n" + "".join(f"ID_a_{label},0.1\n" for label in LABELS)).encode()
    with FakeKaggle(
        max_seconds=60,
        kernel_statuses=["QUEUED", "RUNNING", "COMPLETE"],
        kernel_output={"submission.csv": sub},
        kernel_log="[12:00:00] wrote submission.csv",
    ) as fk:
        waited = _ich(fk, out, "kernel-wait", "--poll", "0.05")
        fetched = _ich(fk, out, "kernel-output")
        submitted = _ich(fk, out, "kaggle-submit", "--message", "first kernel")
    for result in (waited, fetched, submitted):
        assert result.returncode == 0, result.stderr
    assert "queued" in waited.stdout and "running" in waited.stdout and "complete" in waited.stdout
    got = out / "output" / "ich-kaggle-tiny" / "submission.csv"
    assert got.read_bytes() == sub and (got.parent / "ich-kaggle-tiny.log").read_text().endswith("submission.csv")
    (body,) = fk.submissions
    assert body["competitionName"] == COMPETITION and body["submissionDescription"] == "first kernel"
    (token,) = [t for t, n in fk.blob_names.items() if n == "submission.csv"]
    assert fk.uploads[token] == sub and "Successfully submitted" in submitted.stdout

    with FakeKaggle(
        max_seconds=60,
        kernel_statuses=["RUNNING", "ERROR"],
        kernel_failure="Your notebook tried to allocate more memory than is available",
    ) as fk:
        failed = _ich(fk, out, "kernel-wait", "--poll", "0.05")
        empty = _ich(fk, out, "kernel-output")
    assert "ended with error: Your notebook tried to allocate more memory" in _one_line_error(failed)
    assert "no submission.csv" in _one_line_error(empty) and not got.exists()  # the old run's file is gone
    assert "fetch the kernel's output first" in _one_line_error(_ich(fk, out, "kaggle-submit"))
    # an expired download URL's error page saved under the submission's name is never sent
    with FakeKaggle(max_seconds=60, kernel_output={"submission.csv": b"<html><body>Error 403</body></html>\n"}) as fk:
        page = _ich(fk, out, "kernel-output")
    assert "is not a submission" in _one_line_error(page)
    got.write_bytes(b"<html><body>Error 403</body></html>\n")
    assert "is not a submission" in _one_line_error(_ich(fk, out, "kaggle-submit")) and not fk.submissions
    got.write_bytes(sub)
    rules = "You must accept this competition's rules before you'll be able to submit"
    with FakeKaggle(max_seconds=60, submit_error=rules) as fk:
        refused = _ich(fk, out, "kaggle-submit")
    line = _one_line_error(refused)
    assert rules in line and f"{COMPETITION}/rules" in line


def test_kaggle_steps_without_credentials(built, tmp_path):
    names, out = built
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env["HOME"] = str(tmp_path)
    cmd = [
        sys.executable,
        "-m",
        "ich_kaggle",
        "kernel-push",
        "--config",
        "tiny",
        "--out",
        str(out),
        "--username",
        "testuser",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "no Kaggle credentials" in _one_line_error(result) and "KAGGLE_KEY" in result.stderr


def test_stale_model_dataset_warns(built, capsys):
    names, out = built
    cfg = config.load("tiny", TINY_SET)
    runs = out.parent / "runs"
    checkpoint = runs / cfg.name / "fold0" / "best.pt"
    later = (out / names.model_slug / "bundle.json").stat().st_mtime + 60
    os.utime(checkpoint, (later, later))  # retrained after the dataset was built
    kernel.build_kernel(cfg, runs=runs, out=out, username="testuser")
    printed = capsys.readouterr().out
    assert "newer or more folds than" in printed and "(tiny/fold0/best.pt)" in printed
    assert "make kernel-datasets" in printed


def test_kernel_predict_uses_every_visible_gpu(monkeypatch):
    import torch
    from ich_kaggle.predict import stage as predict

    assert predict.inference_devices() == [torch.device("cpu")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # Kaggle's T4 x2: folds are dealt out over both
    assert predict.inference_devices() == [torch.device("cuda", 0), torch.device("cuda", 1)]


def _python(version: str) -> str | None:
    """A working python<version> (Kaggle's image: 3.12; Colab's, its base: 3.13); pyenv's shim may exist but refuse
    to run."""
    candidates = [shutil.which(f"python{version}") or ""] + [
        str(p) for p in sorted(Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}"))
    ]
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "import ensurepip"], capture_output=True).returncode == 0:
            return exe
    return None


@pytest.mark.slow
def test_install_step_on_python312_and_313(tmp_path, cfg):
    """The kernel's install step on Kaggle's Python 3.12 and Colab's 3.13, with no network, from a code dataset
    built here (3.11): every package installs, the binary ones through wheels fetched for 3.12 and 3.13 at build
    time (pylibjpeg-libjpeg: 2.4.0, the newest with such wheels, beside this machine's 2.5.0)."""
    pythons = {v: _python(v) for v in ("3.12", "3.13")}
    if not any(pythons.values()):
        pytest.skip("neither python3.12 nor python3.13 on this machine")
    names = kernel.names_for(cfg, "testuser")
    code = kernel.build_code_dataset(names, tmp_path / "kernels")
    listing = json.loads((code / "wheels.json").read_text())
    optional = {w["name"] for w in listing["wheels"] if w["optional"]}
    assert optional == set(kernel.OPTIONAL_PACKAGES)
    binary = {w["name"] for w in listing["wheels"] if not w["pure"]}
    assert {"blosc2", "ndindex", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"} <= binary
    for version, python in pythons.items():
        if python is None:
            continue
        tag = "cp" + version.replace(".", "")
        fitting = {w["name"] for w in listing["wheels"] if f"-{tag}-" in w["file"] or "-abi3-" in w["file"]}
        assert binary <= fitting, (version, binary - fitting)  # every binary package has a wheel for it
        assert any(w["name"] == "pylibjpeg-libjpeg" and w["version"] == "2.4.0" for w in listing["wheels"])
        venv = tmp_path / f"venv{tag}"
        subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
        script = (
            f"import runpy; from pathlib import Path; "
            f"ns = runpy.run_path({str(ROOT / 'ich_kaggle' / 'kaggle' / 'kernel_install.py')!r}); "
            f"print('missing', sorted(w['name'] for w in ns['pip_install'](Path({str(code)!r}))))"
        )
        env = {**_env(), "PIP_NO_INDEX": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
        result = subprocess.run(
            [str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "missing []" in result.stdout, result.stdout
        names_all = sorted({w["name"] for w in listing["wheels"]} - {"ich_kaggle"})
        check = "import importlib.metadata as m, sys; print(sys.version_info[:2], [m.version(n) for n in sys.argv[1:]])"
        versions = subprocess.run(
            [str(venv / "bin" / "python"), "-c", check, *names_all], capture_output=True, text=True
        )
        assert versions.returncode == 0, versions.stderr  # every package is installed
        assert versions.stdout.startswith(str(tuple(int(x) for x in version.split("."))))


# --- end to end: train a tiny model, build the kernel, run its script offline in a fresh venv ----------------------
def _fresh_venv(folder: Path, first: list[Path] = ()) -> Path:
    """A venv that sees the heavy packages of .venv (torch, timm, ...) through a .pth file but not the repository;
    folders in `first` come before them on sys.path (Kaggle's own numpy and pandas)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = Path(
        subprocess.run(
            [str(folder / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    paths = [str(p) for p in first] + [sysconfig.get_paths()["purelib"]]
    (site / "_ich_kaggle_test_parent.pth").write_text("\n".join(paths) + "\n")
    return folder / "bin" / "python"


# What Kaggle's image has (late 2026: Python 3.12, torch 2.10, numpy 2.0, pandas 2.2) that installs here, on the 3.11
# of .venv: numpy and pandas at Kaggle's versions shadow .venv's; torch, timm, albumentations, opencv, scikit-learn
# come from .venv (torch 2.14.1 CPU: no 2.10 wheel installs here). kernels/README.md lists the same.
KAGGLE_VERSIONS = ("numpy==2.0.2", "pandas==2.2.3", "pytz")
LOCAL_WHEELS = [Path("/opt/pypi/files"), Path("/opt/pypi-more/files")]  # this machine's wheel folders, if present


def kaggle_packages() -> Path:
    """Kaggle's numpy and pandas, installed once into .cache/ (reused by later runs; a few MB from pip's cache)."""
    folder = ROOT / ".cache" / ("kaggle-packages-" + "-".join(v.replace("==", "") for v in KAGGLE_VERSIONS))
    done = folder / ".installed"
    if not done.exists():
        local = [x for d in LOCAL_WHEELS if d.is_dir() for x in ("--find-links", str(d))]
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(folder),
            *KAGGLE_VERSIONS,
        ]
        if subprocess.run(cmd[:4] + ["--no-index", *local] + cmd[4:], capture_output=True).returncode != 0:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)  # from the package index
        done.touch()
    return folder


def _kaggle_input(root: Path, comp: Path, code: Path, model: Path) -> Path:
    """The /kaggle/input layout of a new-style kernel: competition nested one level deeper, datasets under owners."""
    nested = root / COMPETITION / COMPETITION
    nested.mkdir(parents=True)
    for item in comp.iterdir():
        (nested / item.name).symlink_to(item.resolve())
    (root / "datasets" / "testuser").mkdir(parents=True)
    shutil.copytree(code, root / "datasets" / "testuser" / code.name)
    shutil.copytree(model, root / "datasets" / "testuser" / model.name)
    return root


def _run_kernel(
    python: Path, script: Path, root: Path, tmp_path: Path, name: str, stage: str = "stacked"
) -> tuple[subprocess.CompletedProcess, Path]:
    """kernel.py offline in the venv `tmp_path/name`; (its result, the submission.csv it wrote)."""
    working = tmp_path / f"working_{name}"
    working.mkdir()
    dead = "http://127.0.0.1:9"  # any network access fails fast
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NO_PROXY", "no_proxy", kernel_run.STOP_ENV)}
    env.update(
        ICH_KAGGLE_INPUT=str(root),
        ICH_KAGGLE_WORKING=str(working),
        ICH_KAGGLE_SCRATCH=str(tmp_path / f"scratch_{name}"),
        HOME=str(tmp_path / "home"),
        HTTP_PROXY=dead,
        HTTPS_PROXY=dead,
        http_proxy=dead,
        https_proxy=dead,
        PIP_NO_INDEX="1",
    )
    result = subprocess.run(
        [str(python), str(script)], cwd=working, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"from {tmp_path / name}" in result.stdout  # ich_kaggle came from the dataset's wheel, not the repo
    assert "urlopen error" not in result.stderr  # nothing tried the network (the proxy is a dead port)
    assert f"the bundle's {stage.replace('_', ' ')} over" in result.stdout  # the stage `make submit` chose
    # the output: the submission and the per-fold predictions a cut session resumes from; the rest stayed in scratch
    assert sorted(p.name for p in working.iterdir()) == [kernel_run.PREDICTIONS, "submission.csv"]
    return result, working / "submission.csv"


@pytest.mark.slow
def test_kernel_script_offline_equals_make_submit(tmp_path):
    from ich_kaggle.predict import stage as predict
    from ich_kaggle.stack import stage as stack
    from ich_kaggle.submit import stage as submission
    from ich_kaggle import train
    from ich_kaggle.data import folds, preprocess, synth

    comp = synth.write_competition(tmp_path / "comp", seed=0, studies=6, slices=5, size=32)
    overrides = ["cv.k=2", "train.epochs=1", "data.image_size=32", "stack.epochs=3", "data.num_workers=0"]
    cfg = config.load("tiny", overrides)
    layout = Layout.of(comp, tmp_path / "work")
    runs = tmp_path / "runs"
    folds.load_folds(layout, k=cfg.cv.k, seed=cfg.cv.seed)
    preprocess.ensure(layout)
    for fold in range(cfg.cv.k):
        train.train_fold(cfg, layout, fold, runs=runs)
    predict.predict(cfg, layout, runs=runs)
    stack.stack(cfg, layout, runs=runs)
    # what `make submit` runs
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ich_kaggle",
            "submit",
            "--config",
            "tiny",
            "--data",
            str(comp),
            "--work",
            str(layout.work),
            "--runs",
            str(runs),
            "--out-dir",
            str(tmp_path / "submissions"),
            "--set",
            *overrides,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    expected = tmp_path / "submissions" / "tiny.csv"

    out = tmp_path / "kernels"
    kernel.build_datasets(cfg, runs=runs, out=out, username="testuser", layout=layout)
    folder = kernel.build_kernel(cfg, runs=runs, out=out, username="testuser")
    names = kernel.names_for(cfg, "testuser")
    stage = json.loads((names.model_dir(out) / "bundle.json").read_text())["stage"]
    assert stage == json.loads((runs / "tiny" / "choice.json").read_text())["stage"]
    root = _kaggle_input(tmp_path / "input", comp, names.code_dir(out), names.model_dir(out))
    python = _fresh_venv(tmp_path / "venv")
    result, got = _run_kernel(python, folder / "kernel.py", root, tmp_path, "venv", stage=stage)
    from ich_kaggle.data.dataset import usable_cpus

    assert f"{usable_cpus()} loader workers (data.num_workers=-1)" in result.stdout  # sized from this machine
    assert submission.validate_file(comp / "stage_2_sample_submission.csv", got) == []
    a, b = pd.read_csv(expected), pd.read_csv(got)
    assert list(a["ID"]) == list(b["ID"])
    np.testing.assert_allclose(a["Label"].to_numpy(), b["Label"].to_numpy(), rtol=0, atol=1e-6)

    # Kaggle's numpy 2.0 and pandas 2.2: test_ensemble_kernel_equals_make_submit runs its kernel on them

    # fp16 weights in the model dataset: half the upload. The submission moves by float16 rounding, more than 1e-4
    # on this 1-epoch model, so they stay opt-in (--fp16-weights); this checks they load and predict close by.
    half = kernel.build_model_dataset(cfg, names, runs, tmp_path / "half", layout, fp16_weights=True)
    assert json.loads((half / "bundle.json").read_text())["float16"] is True
    full = names.model_dir(out) / "members" / "tiny"
    ratios = [(half / "members" / "tiny" / f.name).stat().st_size / f.stat().st_size for f in full.glob("fold*.pt")]
    assert len(ratios) == cfg.cv.k and max(ratios) < 0.6
    comp_in = root / COMPETITION / COMPETITION
    got = kernel_run.run_kernel(half, comp_in, tmp_path / "working_half", scratch=tmp_path / "scratch_half")
    gap = np.abs(pd.read_csv(got)["Label"].to_numpy() - a["Label"].to_numpy()).max()
    print(f"fp16 weights: checkpoints x{max(ratios):.2f} the size, submission max |difference| {gap:.1e}")
    assert 0 < gap <= 5e-3  # float16 rounding, nothing worse: a wrong tensor moves it by far more

    # without a stacker (first-stage predictions only), in-process: the kernel side matches `make submit` too
    shutil.rmtree(runs / cfg.name / "stack")
    first = submission.submit(cfg, layout, runs=runs, out_dir=tmp_path / "first_stage")
    plain = kernel.build_model_dataset(cfg, names, runs, tmp_path / "plain", layout)
    info = json.loads((plain / "bundle.json").read_text())
    assert info["stage"] == "first_stage" and info["second_stages"] == {} and not (plain / "stack").exists()
    got = kernel_run.run_kernel(plain, comp_in, tmp_path / "working2", scratch=tmp_path / "scratch2")
    a, b = pd.read_csv(first), pd.read_csv(got)
    assert list(a["ID"]) == list(b["ID"])
    np.testing.assert_allclose(a["Label"].to_numpy(), b["Label"].to_numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_ensemble_kernel_equals_make_submit(pair, tmp_path):
    """An ensemble YAML through the kernel (issue 15): its model dataset carries every member's folds, resolved
    config and OOF predictions; the kernel script, on Kaggle's numpy and pandas, predicts each member, combines
    them, refits the stacker over both, chooses by OOF as `make submit` does, and writes the same submission (to
    1e-6: other numpy and pandas). The members are the session's (conftest's `pair`), trained once."""
    import train_helpers

    from ich_kaggle.core import ensemble
    from ich_kaggle.data import folds, preprocess
    from ich_kaggle.predict import stage as predict
    from ich_kaggle.stack import stage as stack
    from ich_kaggle.submit import stage as submission
    from ich_kaggle import train

    comp = pair.data
    ens = train_helpers.pair_yaml(tmp_path / "duo.yaml")
    overrides = train_helpers.PAIR_SETTINGS
    cfg = config.load(str(ens), overrides)
    members = ensemble.load_members(cfg, overrides)
    layout = Layout.of(comp, pair.work)
    runs = pair.runs
    folds.load_folds(layout, k=2, seed=cfg.cv.seed)
    preprocess.ensure(layout)
    for member in members:
        for fold in range(2):
            train.train_fold(member, layout, fold, runs=runs)  # finished: returns at once
    predict.predict_ensemble(cfg, members, layout, runs=runs)
    stack.stack(cfg, layout, runs=runs)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ich_kaggle",
            "submit",
            "--config",
            str(ens),
            "--data",
            str(comp),
            "--work",
            str(layout.work),
            "--runs",
            str(runs),
            "--out-dir",
            str(tmp_path / "subs"),
            "--set",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = tmp_path / "subs" / "duo.csv"

    out = tmp_path / "kernels"
    kernel.build_datasets(cfg, runs=runs, out=out, username="testuser", layout=layout, members=members)
    names = kernel.names_for(cfg, "testuser")
    from ich_kaggle import bundle

    info = bundle.load(names.model_dir(out)).info
    assert [(m["name"], m["folds"]) for m in info["members"]] == [("tiny", [0, 1]), ("tiny_bone", [0, 1])]
    shipped = {p.relative_to(names.model_dir(out)).as_posix() for p in names.model_dir(out).rglob("*")}
    assert {"members/tiny/fold1.pt", "members/tiny_bone/fold0.pt", "members/tiny_bone/config.yaml"} <= shipped
    assert not any("test" in name or "oof" in name for name in shipped)  # test predictions are made in the kernel
    bone = config.load(str(names.model_dir(out) / "members" / "tiny_bone" / "config.yaml"))
    assert bone.to_dict() == members[1].to_dict() and "bone" in bone.data.windows  # each member's own config
    folder = kernel.build_kernel(cfg, runs=runs, out=out, username="testuser")
    root = _kaggle_input(tmp_path / "input", comp, names.code_dir(out), names.model_dir(out))
    # on Kaggle's numpy 2.0 and pandas 2.2 (the single-config kernel test runs on .venv's)
    kaggle_python = _fresh_venv(tmp_path / "kaggle_venv", first=[kaggle_packages()])
    result, got = _run_kernel(kaggle_python, folder / "kernel.py", root, tmp_path, "kaggle_venv", stage=info["stage"])
    check = "import numpy, pandas; print(numpy.__version__, pandas.__version__)"
    versions = subprocess.run(
        [str(kaggle_python), "-c", check], capture_output=True, text=True, check=True
    ).stdout.split()
    assert versions == ["2.0.2", "2.2.3"]
    assert "tiny_bone folds [0, 1], combined (logit)" in result.stdout
    assert info["stage"] == info["submit_stage"] or info["submit_stage"] not in ("first_stage", "stacked")
    assert submission.validate_file(comp / "stage_2_sample_submission.csv", got) == []
    a, b = pd.read_csv(expected), pd.read_csv(got)
    assert list(a["ID"]) == list(b["ID"])
    if info["stage"] == info["submit_stage"]:  # the bundle holds what `make submit` sent
        np.testing.assert_allclose(a["Label"].to_numpy(), b["Label"].to_numpy(), rtol=0, atol=1e-6)
