"""The inference kernel's sessions can be cut: per-fold test predictions kept in /kaggle/working as they finish,
adopted by the next version (same bundle, same test slices) and never recomputed; parts combined into the
submission. In-process on the session's `tiny_bundle` (2 folds), against fake /kaggle/input mounts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ich_kaggle.core.layout import COMPETITION
from ich_kaggle.kaggle import run as kernel_run

USER = "testuser"


def _mount(root: Path, comp: Path, bundle: Path, outputs: dict[str, Path] = {}) -> Path:
    """/kaggle/input as today's kernels see it: the competition, the model dataset, attached kernel outputs."""
    nested = root / "competitions" / COMPETITION / COMPETITION
    nested.mkdir(parents=True)
    for item in comp.iterdir():
        (nested / item.name).symlink_to(item.resolve())
    shutil.copytree(bundle, root / "datasets" / USER / "ich-kaggle-model-tiny")
    for slug, folder in outputs.items():
        shutil.copytree(folder, root / "notebooks" / USER / slug)
    return root


def _kernel(root: Path, working: Path, **kw) -> Path | None:
    """What the kernel script does once ich_kaggle is installed."""
    working.mkdir(parents=True, exist_ok=True)
    return kernel_run.run_kernel(
        kernel_run.find_bundle(root, "tiny"),
        kernel_run.find_test_competition(root),
        working,
        previous=kernel_run.find_previous(root),
        scratch=working.parent / f"scratch_{working.name}",
        **kw,
    )


def _messages(caplog) -> str:
    text = "\n".join(r.getMessage() for r in caplog.records)
    caplog.clear()
    return text


def test_cut_kernel_resumes_from_its_previous_output(tiny_exp, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ich_kaggle")
    tiny_bundle = tiny_exp.bundle
    comp, expected = tiny_exp.comp, tiny_exp.subs / "tiny.csv"  # the fixture's competition and `make submit` output

    # the uncut kernel: equals `make submit` to 1e-6
    whole = _kernel(_mount(tmp_path / "in0", comp, tiny_bundle), tmp_path / "w0")
    a, b = pd.read_csv(expected), pd.read_csv(whole)
    assert list(a["ID"]) == list(b["ID"])
    np.testing.assert_allclose(a["Label"].to_numpy(), b["Label"].to_numpy(), rtol=0, atol=1e-6)
    preds = tmp_path / "w0" / kernel_run.PREDICTIONS
    assert sorted(p.name for p in preds.iterdir()) == [
        "test_slices.csv.gz",
        "test_slices.json",
        "tiny__fold0.json",
        "tiny__fold0.npz",
        "tiny__fold1.json",
        "tiny__fold1.npz",
    ]
    caplog.clear()

    # a session cut after its first fold: fold 0 is in its output, no submission
    monkeypatch.setenv(kernel_run.STOP_ENV, "1")
    assert _kernel(_mount(tmp_path / "in1", comp, tiny_bundle), tmp_path / "w1") is None
    monkeypatch.delenv(kernel_run.STOP_ENV)
    cut = tmp_path / "w1" / kernel_run.PREDICTIONS
    assert (cut / "tiny__fold0.npz").is_file() and not (cut / "tiny__fold1.npz").exists()
    assert not (tmp_path / "w1" / "submission.csv").exists()
    manifest = json.loads((cut / "tiny__fold0.json").read_text())
    assert manifest["bundle"] == kernel_run.sha256(tiny_bundle / "bundle.json") and manifest["fold"] == 0
    _messages(caplog)

    # the next version attaches that output: fold 0 adopted (not recomputed), fold 1 predicted, same submission
    root = _mount(tmp_path / "in2", comp, tiny_bundle, {"ich-kaggle-tiny": tmp_path / "w1"})
    resumed = _kernel(root, tmp_path / "w2")
    log = _messages(caplog)
    assert "tiny fold 0: adopted from" in log and "test slices adopted" in log
    assert "tiny fold 0: " not in log.replace("tiny fold 0: adopted", "")  # fold 0 was not predicted again
    assert "tiny fold 1: " in log and "slices predicted" in log
    assert resumed.read_bytes() == whole.read_bytes()
    kept = tmp_path / "w2" / kernel_run.PREDICTIONS
    assert (kept / "tiny__fold0.npz").read_bytes() == (cut / "tiny__fold0.npz").read_bytes()  # carried forward

    # an output made from another bundle is not adopted: recomputed
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "w1", other)
    info = json.loads((other / kernel_run.PREDICTIONS / "tiny__fold0.json").read_text())
    (other / kernel_run.PREDICTIONS / "tiny__fold0.json").write_text(json.dumps({**info, "bundle": "0" * 64}))
    root = _mount(tmp_path / "in3", comp, tiny_bundle, {"ich-kaggle-tiny": other})
    monkeypatch.setenv(kernel_run.STOP_ENV, "1")
    assert _kernel(root, tmp_path / "w3") is None
    log = _messages(caplog)
    assert "not adopted: made from another bundle" in log and "tiny fold 0: " in log and "slices predicted" in log

    # split: a part kernel runs fold 1 only; the parts' fetched outputs combine locally into the same submission
    monkeypatch.delenv(kernel_run.STOP_ENV)
    assert _kernel(_mount(tmp_path / "in4", comp, tiny_bundle), tmp_path / "w4", folds=[1]) is None
    assert "part done; 1 fold prediction(s) still missing (tiny fold 0)" in _messages(caplog)
    local = kernel_run.combine_local(
        tiny_bundle, [tmp_path / "w1", tmp_path / "w4"], comp / kernel_run.SAMPLE_NAME, tmp_path / "local"
    )
    assert local.read_bytes() == whole.read_bytes()
    # the same through the command (make kernel-finish OUTPUTS="<folders>"), beside the model dataset it was made from
    from ich_kaggle.cli import main

    kernels = tmp_path / "kernels"
    shutil.copytree(tiny_bundle, kernels / "ich-kaggle-model-tiny")
    args = ["--config", "tiny", "--data", str(comp), "--out", str(kernels), "--username", USER]
    assert main(["kernel-finish", *args, "--outputs", str(tmp_path / "w1"), str(tmp_path / "w4")]) == 0
    assert (kernels / "output" / "ich-kaggle-tiny" / "submission.csv").read_bytes() == whole.read_bytes()
    only_fold0 = ["--outputs", str(tmp_path / "w1"), "--slug", "ich-kaggle-tiny-again"]
    assert main(["kernel-finish", *args, *only_fold0]) == 2  # fold 1 missing: one line
