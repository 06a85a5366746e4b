"""Use the trained model on any head CT (issue 23): export a bundle from a two-member ensemble (tiny + tiny_bone,
1 epoch, 2 folds, the synthetic competition, trained once per session), load it, refuse a damaged one, run
`infer` on the real mini set's studies hidden in nested folders and a zip, match `make submit`'s predictions on the
competition's test folder, report skipped inputs, and `evaluate` against slice-, series-, study-level labels and a
CQ500-style reads.csv."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import train_helpers
from ich_kaggle.core.errors import UserError
from ich_kaggle.core.labels import LABELS

L = list(LABELS)


cli = train_helpers.cli


@pytest.fixture(scope="module")
def trained(pair) -> SimpleNamespace:
    """The session's two-member ensemble (conftest's `pair`: trained and predicted once), stacked and submitted, and
    its bundle."""
    tmp = pair.tmp / "apply"
    tmp.mkdir()
    # every stage submit chooses among: first stage, both stacks, their blend (stack.* never retrains a member)
    exp = pair.exp(pair.yaml, "stack.embedding_stage=true")
    for step in (
        ["predict", *exp],  # fresh unless another file re-predicted a member: then this redoes it
        ["stack", *exp],
        ["submit", *exp, "--out-dir", str(tmp / "subs")],
        ["export", *exp, "--out", str(tmp / "bundle")],
    ):
        out = cli(*step)
        assert out.returncode == 0, (step[0], out.stderr[-3000:])
    return SimpleNamespace(tmp=tmp, data=pair.data, runs=pair.runs, exp=exp, bundle=tmp / "bundle", name="pair")


@pytest.mark.slow
def test_bundle_holds_the_chosen_pipeline_and_loads(trained):
    from ich_kaggle import bundle

    b = bundle.load(trained.bundle)
    info = b.info
    choice = json.loads((trained.runs / "pair" / "choice.json").read_text())
    assert info["stage"] == info["submit_stage"] == choice["stage"] and info["format"] == bundle.FORMAT
    assert [m["name"] for m in info["members"]] == ["tiny", "tiny_bone"]
    assert all(m["folds"] == [0, 1] for m in info["members"])
    assert set(info["thresholds"]["slice"]) == set(L) and set(info["thresholds"]["series"]) == set(L)
    assert info["packages"]["torch"] and info["code"]["ich_kaggle"]
    assert (trained.runs / "pair" / "stack" / "models.pt").exists()  # the stack stage saves its fitted nets
    assert all((trained.bundle / n).is_file() for n in info["files"])


@pytest.mark.slow
def test_damaged_bundle_is_refused_in_one_line(trained, tmp_path):
    from ich_kaggle import bundle

    broken = tmp_path / "b1"
    shutil.copytree(trained.bundle, broken)
    (broken / "members" / "tiny" / "fold1.pt").unlink()
    with pytest.raises(UserError, match="1 file\\(s\\) missing: members/tiny/fold1.pt") as e:
        bundle.load(broken)
    assert "\n" not in str(e.value)
    edited = tmp_path / "b2"
    shutil.copytree(trained.bundle, edited)
    info = json.loads((edited / "bundle.json").read_text())
    info["files"]["config.yaml"]["sha256"] = "0" * 64
    (edited / "bundle.json").write_text(json.dumps(info))
    out = cli("infer", "--model", str(edited), "--out", str(tmp_path / "o"), str(trained.data / "stage_2_test"))
    assert out.returncode == 2 and "checksum mismatch for config.yaml" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_export_refuses_stale_predictions(trained, tmp_path):
    best = trained.runs / "tiny" / "fold0" / "best.pt"
    best.touch()  # a newer checkpoint than the predictions were made from
    try:
        out = cli("export", *trained.exp, "--out", str(tmp_path / "b"))
        assert out.returncode == 2 and "stale" in out.stderr and "make predict" in out.stderr
        assert not (tmp_path / "b").exists()
    finally:
        import os
        from ich_kaggle.core import manifest

        m = manifest.read(trained.runs / "tiny" / "predictions" / "test.csv")
        os.utime(best, ns=(m["inputs"]["fold0"]["mtime_ns"], m["inputs"]["fold0"]["mtime_ns"]))


@pytest.mark.slow
def test_infer_equals_submit_on_the_competition_test_folder(trained, tmp_path):
    """The slice probabilities of infer are those `make submit` wrote from (the chosen stage's test.csv)."""
    out = cli(
        "infer", "--model", str(trained.bundle), "--out", str(tmp_path / "out"), str(trained.data / "stage_2_test")
    )
    assert out.returncode == 0, out.stderr[-3000:]
    choice = json.loads((trained.runs / "pair" / "choice.json").read_text())
    submitted = pd.read_csv(choice["test"]).set_index("image_id")
    slices = pd.read_csv(tmp_path / "out" / "slices.csv").set_index("sop_instance_uid")
    assert len(slices) == len(submitted)
    np.testing.assert_allclose(slices[L].to_numpy(), submitted.loc[slices.index, L].to_numpy(), atol=1e-6, rtol=0)
    series = pd.read_csv(tmp_path / "out" / "series.csv")
    top = slices.groupby("series_id")[L].max()
    np.testing.assert_allclose(series.set_index("series_id").loc[top.index, L].to_numpy(), top.to_numpy())
    assert (tmp_path / "out" / "report.html").read_text().count("<img") >= 2


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stacked_embeddings", "blend"])
def test_bundle_runs_the_embedding_stack_and_the_blend_exactly(stage, trained, tmp_path, monkeypatch):
    """The bundle holds exactly the stage submit chose, whichever it is: the embedding-level stack (forced with
    `export --stage`) and the blend (chosen by submit, forced by its choice), and infer on the competition's test
    folder gives that stage's test predictions, which `make submit` sends when it chooses it, to 1e-6."""
    from ich_kaggle import bundle
    from ich_kaggle.submit import choose

    choice_json = trained.runs / "pair" / "choice.json"
    kept = choice_json.read_bytes()  # the module's other tests read submit's real choice
    if stage == "blend":
        real = choose.choose

        def blend_wins(stages, truth, blend_dir):
            _, losses = real(stages, truth, blend_dir)  # writes the blend's files
            return choose.Stage("blend", blend_dir.test, blend_dir.oof), {**losses, "blend": 0.0}

        monkeypatch.setattr(choose, "choose", blend_wins)
        out = cli("export", *trained.exp, "--out", str(tmp_path / "b"))
    else:
        out = cli("export", *trained.exp, "--stage", stage, "--out", str(tmp_path / "b"))
    choice_json.write_bytes(kept)
    monkeypatch.undo()
    assert out.returncode == 0, out.stderr[-3000:]
    info = bundle.load(tmp_path / "b").info
    assert info["stage"] == stage and info["submit_stage"] == (
        "blend" if stage == "blend" else json.loads(kept)["stage"]
    )
    if stage == "blend":
        assert info["blend"]["parts"] == ["stacked", "stacked_embeddings"]
    assert set(info["second_stages"]) == ({"stacked", "stacked_embeddings"} if stage == "blend" else {stage})
    assert info["second_stages"]["stacked_embeddings"]["layout"] == "per_fold"
    assert all(sorted(m["projections"]) == ["0", "1"] for m in info["members"])  # each fold model's own PCA
    res = cli("infer", "--model", str(tmp_path / "b"), "--out", str(tmp_path / "o"), str(trained.data / "stage_2_test"))
    assert res.returncode == 0, res.stderr[-3000:]
    want = pd.read_csv(trained.runs / "pair" / ("blend" if stage == "blend" else "stack_embeddings") / "test.csv")
    want = want.set_index("image_id")
    slices = pd.read_csv(tmp_path / "o" / "slices.csv").set_index("sop_instance_uid")
    assert len(slices) == len(want)
    np.testing.assert_allclose(slices[L].to_numpy(), want.loc[slices.index, L].to_numpy(), atol=1e-6, rtol=0)
    # the Kaggle kernel's path: each fold model's output kept in its working folder (embeddings included where the
    # stage reads them), read back after a cut session, gives the same stage
    from ich_kaggle.apply.infer import predict_fold, run_pipeline
    from ich_kaggle.data import studies
    from ich_kaggle.kaggle.run import FoldStore

    b = bundle.load(tmp_path / "b")
    frame = studies.collect([trained.data / "stage_2_test"]).slices
    store = FoldStore(tmp_path / "kept", "bundle", "slices")
    for entry in b.info["members"]:
        for k in entry["folds"]:
            probs, embs, lost = predict_fold(b, entry, k, frame)
            assert embs is not None and len(embs) == len(frame)  # the per_fold embedding stack reads them
            store.put(entry["name"], k, probs, embs, lost)
    kept_run = run_pipeline(b, frame, fold_predictions=store.get)[0].set_index("image_id")
    np.testing.assert_allclose(kept_run.loc[slices.index, L].to_numpy(), slices[L].to_numpy(), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_export_refuses_an_unknown_or_unsaved_stage_and_load_an_older_format(trained, tmp_path):
    from ich_kaggle import bundle

    out = cli("export", *trained.exp, "--stage", "mixture", "--out", str(tmp_path / "b"))
    assert out.returncode == 2 and "--stage mixture: unknown stage" in out.stderr and not (tmp_path / "b").exists()
    models = trained.runs / "pair" / "stack_embeddings" / "models.pt"
    models.rename(tmp_path / "models.pt")  # a stage fitted before its models were saved
    try:
        out = cli("export", *trained.exp, "--stage", "stacked_embeddings", "--out", str(tmp_path / "b"))
    finally:
        (tmp_path / "models.pt").rename(models)
    assert out.returncode == 2 and "models were not saved" in out.stderr and "make stack" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
    old = tmp_path / "old"
    shutil.copytree(trained.bundle, old)
    info = json.loads((old / "bundle.json").read_text())
    (old / "bundle.json").write_text(json.dumps({**info, "format": bundle.FORMAT - 1}))
    with pytest.raises(UserError, match=f"bundle format {bundle.FORMAT - 1}, this version reads format") as e:
        bundle.load(old)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_saved_second_stage_gives_the_stack_test_predictions_again(trained):
    """Whatever submit chose, the saved stack applied to the members' test predictions is `stack/test.csv`."""
    from ich_kaggle.data import studies
    from ich_kaggle.stack import saved

    frames = [
        pd.read_csv(trained.runs / m / "predictions" / "test.csv", dtype={"image_id": str})
        for m in ("tiny", "tiny_bone")
    ]
    place = studies.collect([trained.data / "stage_2_test"]).slices
    got = saved.apply(saved.load(trained.runs / "pair" / "stack" / "models.pt"), frames, place).set_index("image_id")
    want = pd.read_csv(trained.runs / "pair" / "stack" / "test.csv").set_index("image_id")
    np.testing.assert_allclose(got.loc[want.index, L].to_numpy(), want[L].to_numpy(), atol=1e-6, rtol=0)


def _mini_studies(mini_dir: Path, n: int) -> list[pd.DataFrame]:
    from ich_kaggle.data import studies

    col = studies.collect([mini_dir / "stage_2_train"])
    return [g for _, g in list(col.slices.groupby("study_id", sort=False))[:n]]


@pytest.mark.slow
def test_infer_on_mini_studies_in_nested_folders_and_a_zip(trained, mini_dir, tmp_path):
    from ich_kaggle.data import studies
    from ich_kaggle.apply.infer import infer
    import dicom_factory

    two = _mini_studies(mini_dir, 2)
    nested = tmp_path / "export"
    for i, g in enumerate(two[:1]):
        for j, p in enumerate(g["path"]):
            d = nested / f"x{i}" / f"y{j % 3}" / "z"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, d / f"IM{j:04d}")
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for j, p in enumerate(two[1]["path"]):
            z.write(p, f"DICOM/S1/{j:05d}")
    # what must be skipped, each with its reason
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a dicom")
    dicom_factory.write_ct(junk / "mr.dcm", np.zeros((8, 8), np.int16), modality="MR", series="ID_mr")
    dicom_factory.write_ct(junk / "one.dcm", np.zeros((8, 8), np.int16), series="ID_single")
    dicom_factory.write_ct(junk / "sag.dcm", np.zeros((8, 8), np.int16), series="ID_sag", iop=(0, 1, 0, 0, 0, -1))
    import pydicom

    src = pydicom.dcmread(two[0]["path"].iloc[0])
    src.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    src.SOPInstanceUID = "ID_localizer"
    src.save_as(junk / "scout.dcm")

    col = studies.collect([nested, archive, junk], extract_to=tmp_path / "x")
    assert col.studies == [g["study_id"].iloc[0] for g in two] or set(col.studies) == {
        g["study_id"].iloc[0] for g in two
    }
    for g in two:  # same slices in the same order as the competition layout gives
        got = col.slices[col.slices["study_id"] == g["study_id"].iloc[0]]
        assert got["image_id"].tolist() == g["image_id"].tolist()
    reasons = dict(zip(col.skipped["path"].map(lambda p: Path(p).name), col.skipped["reason"]))
    assert reasons["notes.txt"].startswith("unreadable")
    assert "not a CT image" in reasons["mr.dcm"]
    assert "series of one slice" in reasons["one.dcm"]
    assert "not an axial image" in reasons["sag.dcm"]
    assert "localizer" in reasons["scout.dcm"]

    calls = []
    out = infer(trained.bundle, [nested, archive, junk], tmp_path / "out", progress=lambda w, f: calls.append(f))
    assert calls[0] == 0.0 and calls[-1] == 1.0 and calls == sorted(calls)
    slices = pd.read_csv(out / "slices.csv")
    assert len(slices) == sum(len(g) for g in two) and slices["sop_instance_uid"].is_unique
    assert ((slices[L] >= 0) & (slices[L] <= 1)).all().all()
    assert len(pd.read_csv(out / "studies.csv")) == 2 and len(pd.read_csv(out / "series.csv")) == 2
    assert len(pd.read_csv(out / "skipped.csv")) == 5
    assert not any(p.name.startswith(".extracted") for p in out.iterdir())  # the zip's files are gone
    page = (out / "report.html").read_text()
    assert "not a diagnosis" in page and "Grad-CAM" in page


def test_zip_with_parent_names_is_refused(tmp_path):
    from ich_kaggle.data import studies

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../evil.dcm", b"x")
    with pytest.raises(UserError, match="unsafe name"):
        studies.collect([bad], extract_to=tmp_path / "x")
    assert not (tmp_path / "evil.dcm").exists()


@pytest.mark.slow
def test_evaluate_at_slice_series_study_level_and_cq500_reads(trained, tmp_path):
    from ich_kaggle.apply.evaluate import METRICS, evaluate
    from ich_kaggle.core.metrics import read_truth
    from ich_kaggle.data import studies

    col = studies.collect([trained.data / "stage_2_train"])
    keep = col.slices[col.slices["study_id"].isin(col.studies[:4])]
    truth = read_truth(trained.data / "stage_2_train.csv")
    lab = keep[["image_id", "series_id", "study_id", "path"]].merge(truth, on="image_id")
    inputs = tmp_path / "in"
    for i, (study, g) in enumerate(lab.groupby("study_id", sort=False)):
        d = inputs / f"CQ500CT{i + 1} CQ500CT{i + 1}" / "Unknown Study" / "CT PLAIN THIN"
        d.mkdir(parents=True)
        for p in g["path"]:
            shutil.copy(p, d / Path(p).name)
    levels = {
        "SOPInstanceUID": lab.rename(columns={"image_id": "SOPInstanceUID"}),
        "SeriesInstanceUID": lab.groupby("series_id")[L]
        .max()
        .reset_index()
        .rename(columns={"series_id": "SeriesInstanceUID"}),
        "StudyInstanceUID": lab.groupby("study_id")[L]
        .max()
        .reset_index()
        .rename(columns={"study_id": "StudyInstanceUID"})
        .drop(columns=["epidural"]),
    }  # a subtype left out
    for key, frame in levels.items():
        csv = tmp_path / f"{key}.csv"
        frame[[key, *[c for c in L if c in frame]]].to_csv(csv, index=False)
        t = evaluate(trained.bundle, csv, [inputs], tmp_path / key, n_boot=50)
        assert t["subtype"].tolist() == [c for c in L if c in frame]
        assert (t["POS"] + t["NEG"] == len(frame)).all()
        assert ((t["ACC"] >= t["ACC_lo"] - 1e-9) & (t["ACC"] <= t["ACC_hi"] + 1e-9)).all()
        assert set(METRICS) <= set(t.columns) and t["LOG_LOSS"].notna().all()
        assert "roc.png" in (tmp_path / key / "report.html").read_text()
    # CQ500's reads.csv: three readers, the majority decides (reader 3 disagrees on every finding of study 1)
    studies_y = lab.groupby("study_id", sort=False)[L].max()
    reads = {"name": [f"CQ500-CT-{i + 1}" for i in range(len(studies_y))], "Category": "B1"}
    for r in (1, 2, 3):
        for finding, label in [
            ("ICH", "any"),
            ("IPH", "intraparenchymal"),
            ("IVH", "intraventricular"),
            ("SDH", "subdural"),
            ("EDH", "epidural"),
            ("SAH", "subarachnoid"),
        ]:
            v = studies_y[label].to_numpy().copy()
            if r == 3:
                v[0] = 1 - v[0]
            reads[f"R{r}:{finding}"] = v
    pd.DataFrame(reads).to_csv(tmp_path / "reads.csv", index=False)
    out = cli(
        "evaluate",
        "--model",
        str(trained.bundle),
        "--labels",
        str(tmp_path / "reads.csv"),
        "--out",
        str(tmp_path / "cq"),
        "--bootstrap",
        "200",
        str(inputs),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    t = pd.read_csv(tmp_path / "cq" / "evaluation.csv").set_index("subtype")
    assert t.loc["any", "POS"] == int(studies_y["any"].sum()) and t["POS"].add(t["NEG"]).eq(4).all()
    assert "per study (4 labelled)" in out.stdout and "LOG_LOSS" in out.stdout


@pytest.mark.slow
def test_fp16_bundle_halves_the_weights_and_still_loads(trained, tmp_path):
    import torch

    from ich_kaggle import bundle
    from ich_kaggle.models.checkpoint import load_checkpoint

    out = cli("export", *trained.exp, "--fp16", "--out", str(tmp_path / "half"))
    assert out.returncode == 0, out.stderr[-2000:]
    b = bundle.load(tmp_path / "half")
    assert b.info["float16"] is True
    full, half = trained.bundle / "members/tiny/fold0.pt", tmp_path / "half/members/tiny/fold0.pt"
    state = torch.load(half, weights_only=False)["model"]
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert half.stat().st_size < 0.7 * full.stat().st_size
    net, _ = load_checkpoint(half)
    assert next(net.parameters()).dtype == torch.float32
