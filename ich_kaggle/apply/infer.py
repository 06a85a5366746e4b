"""`infer`: a model bundle on any head CT (files, nested folders, zips; several studies at once).

The pipeline is exactly the one `submit` chose and the bundle records: each member's fold models with its TTA
(`predict.stage.predict_folds`, the function `make predict` runs), the folds averaged as predict averages them, the
members combined as the ensemble says; then, if chosen, a saved second stage (`stack.saved.apply`: the probability
stack, or the embedding stack over each fold model's own embeddings projected by its bundled PCA), or the blend (the
mean of its parts, as `submit` blends them). Slices are read from their DICOMs with the cache's int16 HU
(`data.source.slice_hu`), so on the competition's test folder the slice probabilities are those of `make submit`.

Outputs in `out/`:
- `slices.csv`: study_id, series_id, sop_instance_uid, slice_rank, position (along the slice normal, mm), file, and
  the six probabilities of the chosen stage;
- `series.csv` / `studies.csv`: per series / study, per subtype: the probability, `<subtype>_positive` (probability
  >= the bundle's series threshold) and `<subtype>_slices` (slice ranks whose probability is >= the bundle's slice
  threshold, `;`-separated). The series probability is the MAX over its slices of the chosen stage: a series holds
  a hemorrhage when one of its slices does (the competition labels slices; a study's label is the OR of its
  slices), and the second stage has already smoothed each slice with its neighbours, so one noisy slice is damped
  before the max. A study's probability is the max over its series. The thresholds were fixed on the bundle's OOF;
- `skipped.csv`: the inputs left out, with the reason;
- `report.html` (`apply.report`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..core.io import write_csv
from ..core.labels import LABELS

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
L = list(LABELS)


def _fold_models(bundle, entry: dict, devices) -> dict:
    """A member's fold models: loaded for this call, or once and kept on the bundle when `bundle.kept_models` is a
    dict (the web app, which runs many uploads with one bundle, sets it)."""
    from ..predict.stage import load_fold_models

    kept = getattr(bundle, "kept_models", None)
    if kept is not None and entry["name"] in kept:
        return kept[entry["name"]]
    models = load_fold_models(bundle.checkpoints(entry), devices)
    if kept is not None:
        kept[entry["name"]] = models
    return models


def _projections(bundle, entry: dict) -> dict:
    """A member's fold models' embedding projections (`predict.compact`), as the per_fold embedding stack reads."""
    from ..predict.compact import Projection

    return {int(k): Projection.load(bundle.dir / f) for k, f in (entry.get("projections") or {}).items()}


def blend(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The mean of the parts' probabilities over the images every part predicts, as `submit.choose` blends them."""
    parts = [
        f.assign(image_id=f["image_id"].astype(str)).drop_duplicates("image_id").set_index("image_id") for f in frames
    ]
    ids = parts[0].index
    for f in parts[1:]:
        ids = ids.intersection(f.index, sort=False)
    values = np.mean([f.loc[ids, L].to_numpy(np.float64) for f in parts], axis=0)
    out = pd.DataFrame(values, columns=L)
    out.insert(0, "image_id", ids.to_numpy())
    return out


def _parts(info: dict) -> list[str]:
    """The stages the chosen one is made of: the blend's parts, or the stage itself."""
    return info["blend"]["parts"] if info["stage"] == "blend" else [info["stage"]]


def embedding_layouts(bundle) -> set[str]:
    """The saved second stages' layouts that read embeddings (mixture, per_fold) among the chosen stage's parts."""
    info = bundle.info
    layouts = {info["second_stages"][p].get("layout") for p in _parts(info) if p != "first_stage"}
    return layouts & {"mixture", "per_fold"}


# one fold model of one member on the slices: (wide probabilities, embeddings indexed by image_id or None, lost ids)
FoldPredictions = Callable[[dict, int], tuple[pd.DataFrame, pd.DataFrame | None, list]]


def predict_fold(
    bundle, entry: dict, fold: int, slices: pd.DataFrame, devices=None, cfg=None
) -> tuple[pd.DataFrame, pd.DataFrame | None, list]:
    """One fold model of one member (`entry` of `bundle.info["members"]`) on `slices`: (wide probabilities, its
    embeddings when the bundle's second stage reads them, ids of the images that could not be read). What
    `run_pipeline` combines, one fold at a time, so a caller can keep each fold's result as it finishes (the Kaggle
    kernel, whose session may be cut). `cfg`: the member's config when the caller changed it (e.g. its loader
    workers); default: the bundle's."""
    from ..data.source import DicomSlices
    from ..predict.stage import inference_devices, load_fold_models, predict_folds

    devices = devices or inference_devices()
    models = load_fold_models({fold: bundle.checkpoints(entry)[fold]}, devices)
    probs, embs, failed = predict_folds(
        models,
        slices,
        cfg or bundle.member_config(entry),
        meta=slices,
        read_hu=DicomSlices("/", slices),
        desc=entry["name"],
    )
    return probs[fold], embs.get(fold) if embedding_layouts(bundle) else None, failed.tolist()


def run_pipeline(
    bundle, slices: pd.DataFrame, progress: Progress | None = None, fold_predictions: FoldPredictions | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """(chosen stage's wide probabilities, first stage's, images that could not be read) for the slices of a
    collection (absolute paths), through the bundle's pipeline: the first stage; a saved second stage (with
    embeddings: each fold model's own, projected as `make predict` projected them); or the blend of its parts.

    `fold_predictions(entry, fold)`, when given, supplies each member's fold predictions (as `predict_fold` makes
    them) instead of running the fold models here: the Kaggle kernel passes the ones it saved or adopted."""
    import torch

    from ..core.ensemble import combine
    from ..core.config import EnsembleConfig
    from ..data.source import DicomSlices
    from ..predict.stage import average_folds, inference_devices, predict_folds
    from ..stack import saved

    info = bundle.info
    stage = info["stage"]
    parts = _parts(info)
    stacks = {p: saved.load(bundle.dir / info["second_stages"][p]["file"]) for p in parts if p != "first_stage"}
    layouts = {s.layout for s in stacks.values()}
    reader = DicomSlices("/", slices)
    devices = inference_devices() if fold_predictions is None else None
    members = info["members"]
    frames, fold_probs, raw, compact, lost = [], [], [], [], []
    n_models = sum(len(m["folds"]) for m in members)
    done = 0
    for entry in members:
        mcfg = bundle.member_config(entry)
        if fold_predictions is None:
            models = _fold_models(bundle, entry, devices)
            if progress:
                progress(
                    f"{entry['name']}: {len(models)} fold model(s) on {len(slices)} slices",
                    0.1 + 0.7 * done / n_models,
                )
            probs, embs, failed = predict_folds(models, slices, mcfg, meta=slices, read_hu=reader, desc=entry["name"])
            lost += failed.tolist()
            done += len(models)
            del models
        else:
            got = {k: fold_predictions(entry, k) for k in entry["folds"]}
            probs = {k: g[0] for k, g in got.items()}
            embs = {k: g[1] for k, g in got.items() if g[1] is not None}
            lost += [i for g in got.values() for i in g[2]]
        frames.append(average_folds(list(probs.values()), mcfg.tta.average))
        fold_probs.append(probs)
        raw.append(embs if "mixture" in layouts else None)
        if "per_fold" in layouts:
            proj = _projections(bundle, entry)
            compact.append(
                {k: pd.DataFrame(proj[k].apply(e.to_numpy()), index=e.index) for k, e in embs.items() if k in proj}
            )
        del embs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if info.get("ensemble"):
        ens = info["ensemble"]
        first = combine(
            frames,
            EnsembleConfig(members=[m["name"] for m in members], combine=ens["combine"], weights=list(ens["weights"])),
        )
    else:
        first = frames[0]
    if progress and stacks:
        progress("second stage", 0.82)
    outputs = []
    for p in parts:
        if p == "first_stage":
            outputs.append(first)
            continue
        s = stacks[p]
        embs = {"probs": None, "mixture": raw, "per_fold": compact}[s.layout]
        outputs.append(saved.apply(s, frames, slices, fold_probs=fold_probs, fold_embeddings=embs))
    chosen = blend(outputs) if stage == "blend" else outputs[0]
    return chosen, first, sorted(set(lost))


def _above(ranks: pd.Series, probs: pd.Series, t: float) -> str:
    return ";".join(str(int(r)) for r, p in zip(ranks, probs) if p >= t)


def summarise(slices: pd.DataFrame, thresholds: dict, level: str) -> pd.DataFrame:
    """Per series (level="series_id") or study ("study_id"): max probability, positive flag, slices above."""
    keys = ["study_id", "series_id"] if level == "series_id" else ["study_id"]
    rows = []
    for key, g in slices.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key))
        row["n_series"] = g["series_id"].nunique()
        row["n_slices"] = len(g)
        for c in L:
            p = float(g[c].max())
            row[c] = p
            row[f"{c}_positive"] = int(p >= thresholds["series"][c])
            row[f"{c}_slices"] = (
                _above(g["slice_rank"], g[c], thresholds["slice"][c])
                if level == "series_id"
                else ";".join(
                    f"{s[-8:]}:{r}"
                    for s, r, p in zip(g["series_id"], g["slice_rank"], g[c])
                    if p >= thresholds["slice"][c]
                )
            )
        rows.append(row)
    out = pd.DataFrame(rows)
    if level == "series_id":
        out = out.drop(columns="n_series")
    return out


def infer(
    bundle, paths: list[Path], out: Path, progress: Progress | None = None, report: bool = True, collection=None
) -> Path:
    """Run the bundle on `paths`; write slices.csv, series.csv, studies.csv, skipped.csv, report.html in `out`."""
    from ..bundle import Bundle, load
    from ..data import studies

    start = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else load(bundle)  # a refused bundle writes nothing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if progress:
        progress("reading the inputs", 0.0)
    with tempfile.TemporaryDirectory(dir=out, prefix=".extracted-") as tmp:
        col = collection if collection is not None else studies.collect([Path(p) for p in paths], extract_to=Path(tmp))
        frame = col.slices
        chosen, first, lost = run_pipeline(b, frame, progress)
        skipped = col.skipped
        if lost:
            gone = frame[frame["image_id"].isin(lost)]
            skipped = pd.concat(
                [skipped, pd.DataFrame({"path": gone["path"], "reason": "pixels unreadable"})], ignore_index=True
            )
            frame = frame[~frame["image_id"].isin(lost)]
        probs = chosen.set_index("image_id").loc[frame["image_id"], L].to_numpy(np.float64)
        table = pd.DataFrame(
            {
                "study_id": frame["study_id"].to_numpy(),
                "series_id": frame["series_id"].to_numpy(),
                "sop_instance_uid": frame["image_id"].to_numpy(),
                "slice_rank": frame["slice_rank"].to_numpy(),
                "position": frame["z"].to_numpy(),
                "file": frame["path"].to_numpy(),
            }
        )
        table[L] = probs
        write_csv(table, out / "slices.csv")
        th = b.thresholds
        series = summarise(table, th, "series_id")
        study = summarise(table, th, "study_id")
        write_csv(series, out / "series.csv")
        write_csv(study, out / "studies.csv")
        write_csv(skipped, out / "skipped.csv")
        seconds = time.perf_counter() - start
        if report:
            from .report import infer_report

            if progress:
                progress("report", 0.9)
            infer_report(b, table, series, study, skipped, out, seconds)
    if progress:
        progress("done", 1.0)
    log.info(
        f"infer: {len(table)} slices, {len(series)} series, {len(study)} studies in {seconds:.1f}s "
        f"({len(table) / max(seconds, 1e-9):.1f} slices/s); {len(skipped)} input(s) skipped -> {out}"
    )
    return out
