"""`make predict`: every trained fold with test-time augmentation on the test images and on its own validation images.

Writes `runs/<cfg>/predictions/`: `test_fold<k>.csv` (one per fold), `test.csv` (fold average), `oof.csv` (each fold
predicts its own validation images, with the same TTA, so the stacker trains on what it will see at test time),
`test_embeddings.npz` / `oof_embeddings.npz` (TTA-averaged pooled features; test fold-averaged) and
`unreadable_test.csv` (test images that cannot be read: the submission gives them the training prior).

Each batch of images is loaded once and run through every fold model (decoding dominates on CPU and at scale).
Resumable: each fold's results are kept as `{test,oof}_fold<k>.csv` + `{test,oof}_fold<k>_embeddings.npz`; a rerun
reuses a fold whose manifest says it was made from the same best.pt, TTA and images (`core.freshness`). A fold whose
training has not finished is never used: predict names it and stops.
"""

from __future__ import annotations

import logging
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.labels import LABELS
from ..core.config import Config, StackConfig
from ..engine.dist import pick_device
from ..engine.precision import choose as choose_precision
from ..core.errors import UserError
from ..core.io import atomic_open, write_csv
from ..core import freshness, manifest, provenance
from ..core.layout import Layout, Predictions, Run
from ..data.dataset import loader_workers
from ..core.config import selected_folds
from .compact import Projection, fit_projection
from .tta import tta_forward

log = logging.getLogger(__name__)

LABEL_COLS = list(LABELS)

# --- folds, frames, files ---


@dataclass
class FoldModel:
    fold: int
    net: torch.nn.Module
    cfg: Config  # the config it was trained with (data settings come from here)
    device: torch.device = torch.device("cpu")  # where its weights live (folds are dealt out over the GPUs)


def inference_devices() -> list[torch.device]:
    """Every visible GPU (Kaggle's T4 x2: two), else the CPU; fold models are dealt out over them."""
    if torch.cuda.is_available():
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [pick_device()]


def wide(ids, probs: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=LABEL_COLS)
    frame.insert(0, "image_id", np.asarray(ids, dtype=str))
    return frame


def average_folds(frames: list[pd.DataFrame], average: str = "prob") -> pd.DataFrame:
    """Per-image mean of several wide prediction frames (same images; order of the first)."""
    ids = frames[0]["image_id"].astype(str)
    stack = []
    for frame in frames:
        aligned = frame.assign(image_id=frame["image_id"].astype(str)).set_index("image_id").reindex(ids)
        if aligned[LABEL_COLS].isna().any().any():
            raise ValueError("fold predictions cover different images")
        stack.append(aligned[LABEL_COLS].to_numpy(np.float64))
    arr = np.stack(stack)
    if average == "logit":
        p = np.clip(arr, 1e-7, 1 - 1e-7)
        mean = 1 / (1 + np.exp(-np.log(p / (1 - p)).mean(0)))
    else:
        mean = arr.mean(0)
    return wide(ids.to_numpy(), mean)


def save_embeddings(path: Path, ids, emb: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, image_id=np.asarray(ids, dtype=str), emb=np.asarray(emb, dtype=np.float16))


def load_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["image_id"].astype(str), z["emb"]


def embedding_mode(stack: StackConfig) -> str:
    """Which embedding files the second stage will read, so predict writes only those (issue 26):
    none (no stage reads embeddings), pca<d> (stack.embedding_space=per_fold: each fold model's own, as its
    `stack.embedding_dim` principal components, `predict.compact`) or full (mixture: every fold model's full
    embeddings, averaged over the fold models for the test images, as that design needs)."""
    if not (stack.use_embeddings or stack.embedding_stage):
        return "none"
    return f"pca{stack.embedding_dim}" if stack.embedding_space == "per_fold" else "full"


def _fold_files(out: Predictions, fold: int, mode: str) -> list[Path]:
    """What predicting one fold model writes, beside its OOF file (whose manifest marks them all done)."""
    files = [out.test_fold(fold)]
    if mode != "none":
        files += [out.test_fold_embeddings(fold), out.oof_fold_embeddings(fold)]
    if mode.startswith("pca"):
        files.append(out.fold_projection(fold))
    return files


def _missing(out: Predictions, fold: int, mode: str = "full") -> str | None:
    files = [out.oof_fold(fold), *_fold_files(out, fold, mode)]
    gone = [f.name for f in files if not f.exists()]
    return f"{', '.join(gone)} missing" if gone else None


def trained_folds(cfg: Config, runs: str | Path) -> tuple[list[int], list[int], list[int]]:
    """(finished folds, folds with a best.pt whose training has not finished, wanted folds not trained at all)."""
    run = Run.of(runs, cfg.name)
    wanted = selected_folds(cfg.cv)
    finished = run.finished(wanted)
    unfinished = [k for k in wanted if run.fold(k).best.exists() and k not in finished]
    return finished, unfinished, [k for k in wanted if not run.fold(k).best.exists()]


def unreadable_test(meta: pd.DataFrame, cached: set[str], sample_csv: Path) -> pd.DataFrame:
    """Test images in the sample submission (or meta) that were skipped by the meta scan or are not in the cache."""
    test_ids = set(meta.loc[meta["split"] == "test", "image_id"].astype(str))
    rows = [(i, "not cached (unreadable DICOM?)") for i in sorted(test_ids - cached)]
    if sample_csv.exists():
        sample_ids = pd.read_csv(sample_csv, usecols=[0]).iloc[:, 0].astype(str).str.rsplit("_", n=1).str[0]
        rows += [(i, "skipped by the meta scan (unreadable DICOM)") for i in sorted(set(sample_ids) - test_ids)]
    return pd.DataFrame(rows, columns=["image_id", "reason"])


def _loader(
    frame: pd.DataFrame,
    layout: Layout | None,
    data_cfg: Config,
    meta: pd.DataFrame,
    batch: int,
    workers: int,
    device: torch.device,
    read_hu=None,
):
    """Images read as the fold was trained (`data_cfg`: windows, size, 2.5D), with this machine's worker count, from
    the cache `predict` ensured and chose its images by, whatever source the fold trained from (same HU); or, for
    `infer`, through `read_hu` (image_id -> int16 HU of any DICOM, `data.source.slice_hu`: the cache's values)."""
    from ..data.dataset import SliceDataset
    from ..data.transforms import build_eval_transforms

    data_cfg = _from_cache(data_cfg)
    ds = SliceDataset(
        frame, layout, data_cfg, transform=build_eval_transforms(data_cfg), train=False, meta=meta, read_hu=read_hu
    )
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda"
    )


def _from_cache(cfg: Config) -> Config:
    """`cfg` reading the cache (data.source=cache): a copy where a fold was trained from its DICOMs."""
    if cfg.data.source == "cache":
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="cache"))


def inference_precision(cfg: Config, device: torch.device):
    """train.amp as the GPU allows (see engine.precision); float32 on CPU, where bf16 autocast is slower."""
    return choose_precision(cfg.train.amp if device.type == "cuda" else "none", device)


@torch.inference_mode()
def predict_frame(
    models: list[FoldModel],
    frame: pd.DataFrame,
    layout: Layout | None,
    cfg: Config,
    meta: pd.DataFrame,
    desc: str = "predict",
    read_hu=None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Every model on every image of `frame` (loaded once): ([(probs (N, 6), embeddings (N, D) float32)] per model,
    bool (N,) of the images that could not be loaded: their rows are to be left out, not predicted blank).

    Each batch goes to every model's device and all models are launched before any result is copied back, so
    models on different GPUs run at the same time (CUDA launches are asynchronous)."""
    data_cfg = models[0].cfg
    devices = list(dict.fromkeys(m.device for m in models))
    loader = _loader(
        frame, layout, data_cfg, meta, cfg.tta.batch_size, loader_workers(cfg.data.num_workers), devices[0], read_hu
    )
    precision = {d: inference_precision(cfg, d) for d in devices}
    out: list[tuple[list, list]] = [([], []) for _ in models]
    failed = []
    for x, y, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        failed.append(torch.isnan(y[:, 0]).numpy())  # the dataset's mark of an image it could not load
        on = {d: x.to(d, non_blocking=True) for d in devices}
        on = {d: v.contiguous(memory_format=torch.channels_last) if d.type == "cuda" else v for d, v in on.items()}
        launched = []
        for m in models:
            with precision[m.device].autocast():
                launched.append(tta_forward(m.net, on[m.device], cfg.tta.transforms, cfg.tta.average))
        for (probs, embs), (p, f) in zip(out, launched):
            probs.append(p.cpu().numpy())
            embs.append(f.cpu().numpy())
    result = []
    for probs, embs in out:
        d = models[0].net.num_features if hasattr(models[0].net, "num_features") else 0
        result.append(
            (
                np.concatenate(probs) if probs else np.zeros((0, len(LABELS)), np.float32),
                np.concatenate(embs) if embs else np.zeros((0, d), np.float32),
            )
        )
    return result, (np.concatenate(failed) if failed else np.zeros(0, bool))


def _kept(
    ids: pd.Series, results: list[tuple[np.ndarray, np.ndarray]], failed: np.ndarray, what: str
) -> tuple[pd.Series, list[tuple[np.ndarray, np.ndarray]]]:
    """The rows of the images that loaded; the others are named in the log (and, for test, in unreadable.csv)."""
    if not failed.any():
        return ids, results
    log.warning(
        f"predict: {int(failed.sum())} {what} image(s) could not be loaded from the cache and are left out "
        f"(e.g. {ids[failed].iloc[0]}); delete their cache files and rerun `python -m ich_kaggle preprocess`"
    )
    keep = ~failed
    return ids[keep].reset_index(drop=True), [(p[keep], e[keep]) for p, e in results]


def _groups(models: list[FoldModel]) -> list[list[FoldModel]]:
    """Folds that read images the same way (windows, size, 2.5D neighbours) share one pass over the images."""
    groups: dict[str, list[FoldModel]] = {}
    for m in models:
        groups.setdefault(repr(_from_cache(m.cfg).data), []).append(m)
    return list(groups.values())


def _recache(layout: Layout, ids: pd.Series) -> bool:
    """Cache entries that did not decode at predict time, made again from their DICOMs (a damage their size and mtime
    did not show); True when something was made again, so the images are predicted instead of given the prior."""
    from ..data import cache, preprocess

    if not (layout.train_dir.is_dir() or layout.test_dir.is_dir()):
        return False  # the cache alone (no DICOMs): nothing to make them from
    for image_id in ids.astype(str):
        cache.cache_path(layout, image_id).unlink(missing_ok=True)
    log.info(
        f"predict: {len(ids)} cache entr{'y' if len(ids) == 1 else 'ies'} did not decode (e.g. {ids.iloc[0]}); "
        f"making them again from their DICOMs"
    )
    done = preprocess.ensure(layout)
    return bool(done and done["cached"])


def load_fold_models(checkpoints: dict[int, Path], devices: list[torch.device]) -> list[FoldModel]:
    """Each fold's checkpoint as a FoldModel, dealt out over `devices` (predict's runs and infer's bundle)."""
    from ..models.checkpoint import load_checkpoint

    models = []
    for i, (k, path) in enumerate(checkpoints.items()):
        device = devices[i % len(devices)]
        net, fcfg = load_checkpoint(path, map_location=device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        models.append(FoldModel(k, net, fcfg, device))
    return models


def predict_folds(
    models: list[FoldModel],
    frame: pd.DataFrame,
    cfg: Config,
    meta: pd.DataFrame,
    read_hu=None,
    layout: Layout | None = None,
    desc: str = "predict",
) -> tuple[dict[int, pd.DataFrame], dict[int, pd.DataFrame], pd.Series]:
    """Every fold model on the images of `frame`, each batch loaded once per group of folds that read images alike:
    ({fold: wide probabilities}, {fold: embeddings frame}, ids of the images that could not be loaded)."""
    probs, embs, lost = {}, {}, []
    for group in _groups(models):
        results, failed = predict_frame(group, frame, layout, cfg, meta, desc=desc, read_hu=read_hu)
        lost.append(frame["image_id"][failed])
        ids, results = _kept(frame["image_id"], results, failed, desc)
        for m, (p, e) in zip(group, results):
            probs[m.fold] = wide(ids, p)
            embs[m.fold] = pd.DataFrame(e, index=ids.to_numpy())
    return dict(sorted(probs.items())), dict(sorted(embs.items())), pd.concat(lost).drop_duplicates()


@dataclass
class _Plan:
    """What one `predict` resolved before any model runs: the folds, the images (from one listing of the cache) and
    which folds' files are stale; every later step reads from it."""

    run: Run
    have: list[int]  # the finished folds: the averaged files cover every one
    meta: pd.DataFrame  # image_id as str
    test: pd.DataFrame  # the cached test images
    val: dict[int, pd.DataFrame]  # each fold's cached validation images
    bad: pd.DataFrame  # test images that cannot be read (image_id, reason)
    mode: str  # embedding files written (`embedding_mode`)
    expected: dict[int, dict]  # each fold's manifest as it would be written now
    todo: list[int]  # folds whose files are stale or missing

    @property
    def out(self) -> Predictions:
        return self.run.predictions

    @property
    def dim(self) -> int:
        """Principal components kept per fold model (pca<d>), else 0."""
        return int(self.mode[3:]) if self.mode.startswith("pca") else 0


def _finished_folds(cfg: Config, runs: str | Path) -> list[int]:
    """The folds to predict with; stops on a fold whose training did not finish, or when no fold is trained."""
    run = Run.of(runs, cfg.name)
    have, unfinished, missing = trained_folds(cfg, runs)
    if unfinished:
        raise UserError(
            f"fold(s) {unfinished} of {cfg.name} have a best.pt but their training did not finish (no "
            f"{run.fold(unfinished[0]).done.name} in {run.fold(unfinished[0]).dir}); finish them with "
            f"`make train fold={unfinished[0]}` (it resumes), or `make predict FINISH=1` to do that first"
        )
    if not have:
        raise UserError(
            f"no trained fold under {run.dir} (no fold<k>/best.pt); "
            f"run `make train-all CONFIG={cfg.name}` (or `make train FOLD=k`) first"
        )
    if missing:
        log.info(f"predict: fold(s) {missing} not trained (no best.pt); predicting with fold(s) {have}")
    return have


def _images(
    cfg: Config, layout: Layout, runs: str | Path, have: list[int], via: str | None
) -> tuple[pd.DataFrame, pd.DataFrame, dict[int, pd.DataFrame], pd.DataFrame]:
    """(meta, cached test images, each fold's cached validation images, unreadable test images), after checking
    that every fold was trained on this data, split and config, and ensuring the cache."""
    from ..data import cache, preprocess, trained
    from ..data.folds import fold_table
    from ..data.meta import load_meta

    run = Run.of(runs, cfg.name)
    trained.check(cfg, layout, runs, via)  # stops where the folds were trained on another split or config
    meta = load_meta(layout)
    folds = fold_table(layout, cfg.cv)  # the folds training used (cv.split)
    current = provenance.data_identity(layout.data, folds)
    for k in have:  # a fold trained on other data is never mixed into these predictions
        provenance.check_data(provenance.recorded(run.fold(k).done).get("data"), current, run.fold(k).dir, cfg.name)
    preprocess.ensure(layout)
    cached = cache.cached_ids(layout)
    meta = meta.assign(image_id=meta["image_id"].astype(str))
    bad = unreadable_test(meta, cached, layout.sample_csv)
    test = meta[(meta["split"] == "test") & meta["image_id"].isin(cached)].reset_index(drop=True)
    val = {k: folds[(folds["fold"] == k) & folds["image_id"].isin(cached)].reset_index(drop=True) for k in have}
    return meta, test, val, bad


def _stale_folds(
    cfg: Config, run: Run, have: list[int], test: pd.DataFrame, val: dict[int, pd.DataFrame], mode: str
) -> tuple[dict[int, dict], list[int]]:
    """(each fold's manifest as it would be written now, the folds whose files do not match it), each reuse and
    each recomputation named in the log."""
    out = run.predictions
    expected = {
        k: freshness.prediction_fold(
            run, k, cfg.tta, test["image_id"].tolist(), val[k]["image_id"].tolist(), embeddings=mode
        )
        for k in have
    }
    stale = {k: freshness.stale_reason(out.oof_fold(k), expected[k]) or _missing(out, k, mode) for k in have}
    todo = [k for k in have if stale[k]]
    if len(todo) < len(have):
        log.info(
            f"predict: fold(s) {[k for k in have if k not in todo]} already predicted (same checkpoint, TTA and "
            f"images); reusing"
        )
    for k in todo:
        if manifest.read(out.oof_fold(k)) is not None:
            log.info(f"predict: fold {k} predicted again: {stale[k]}")
    return expected, todo


def _resolve(cfg: Config, layout: Layout, runs: str | Path, via: str | None, reads: StackConfig | None) -> _Plan:
    run = Run.of(runs, cfg.name)
    have = _finished_folds(cfg, runs)
    meta, test, val, bad = _images(cfg, layout, runs, have, via)
    mode = embedding_mode(reads or cfg.stack)
    expected, todo = _stale_folds(cfg, run, have, test, val, mode)
    return _Plan(run, have, meta, test, val, bad, mode, expected, todo)


def _load_todo(cfg: Config, plan: _Plan) -> list[FoldModel]:
    """The models of the folds to predict, dealt out over this machine's devices (named in the log)."""
    devices = inference_devices()
    if plan.todo:
        for device in devices:  # stops on an unusable GPU
            log.info(f"predict: {device}, {inference_precision(cfg, device).describe()}")
        log.info(
            f"predict: {loader_workers(cfg.data.num_workers)} loader workers (data.num_workers={cfg.data.num_workers})"
        )
    return load_fold_models({k: plan.run.fold(k).best for k in plan.todo}, devices)


def _predict_loaded(
    models: list[FoldModel], frame: pd.DataFrame, layout: Layout, cfg: Config, meta: pd.DataFrame, desc: str, what: str
) -> tuple[pd.Series, list[tuple[np.ndarray, np.ndarray]]]:
    """`predict_frame` on the images of `frame` (none: empty results); cache entries that did not decode are made
    again from their DICOMs and predicted once more, images that still fail are left out: (ids, results)."""
    empty = (np.zeros((0, len(LABELS))), np.zeros((0, 0)))
    results, failed = (
        predict_frame(models, frame, layout, cfg, meta, desc=desc)
        if len(frame)
        else ([empty] * len(models), np.zeros(0, bool))
    )
    if failed.any() and _recache(layout, frame["image_id"][failed]):  # damaged entries made again: once more
        results, failed = predict_frame(models, frame, layout, cfg, meta, desc=desc)
    return _kept(frame["image_id"], results, failed, what)


def _predict_oof(m: FoldModel, plan: _Plan, layout: Layout, cfg: Config) -> Projection | None:
    """One fold model on its own validation images: writes its OOF files; returns its projection (pca<d>), fitted
    on these OOF embeddings (a kernel without training images loads the shipped projection instead)."""
    out, dim = plan.out, plan.dim
    ids, ((p, e),) = _predict_loaded(
        [m], plan.val[m.fold], layout, cfg, plan.meta, f"oof fold {m.fold}", f"fold {m.fold} OOF"
    )
    projection = None
    if dim:
        if len(ids):
            projection = fit_projection(e, dim, seed=m.fold)
            projection.save(out.fold_projection(m.fold))
        else:
            projection = Projection.load(out.fold_projection(m.fold))
        e = projection.apply(e) if len(e) else np.zeros((0, dim), np.float16)
    if plan.mode != "none":
        save_embeddings(out.oof_fold_embeddings(m.fold), ids, e)
    write_csv(wide(ids, p), out.oof_fold(m.fold))
    return projection


def _predict_group(group: list[FoldModel], plan: _Plan, layout: Layout, cfg: Config) -> None:
    """Folds that read images alike: each on its OOF images first (its projection is fitted there), then all on the
    test images in one pass; each fold's manifest is written last, marking its files done."""
    out = plan.out
    projections = {m.fold: _predict_oof(m, plan, layout, cfg) for m in group}
    ids, results = _predict_loaded(group, plan.test, layout, cfg, plan.meta, "test", "test")
    for m, (p, e) in zip(group, results):
        if plan.mode != "none":
            save_embeddings(out.test_fold_embeddings(m.fold), ids, projections[m.fold].apply(e) if plan.dim else e)
        write_csv(wide(ids, p), out.test_fold(m.fold))
        manifest.write(out.oof_fold(m.fold), plan.expected[m.fold], also=_fold_files(out, m.fold, plan.mode))


def _write_test(plan: _Plan, cfg: Config) -> pd.DataFrame:
    """test.csv: the fold average over the test images every fold predicted (and, for the mixture design, their
    fold-averaged embeddings); returns the unreadable test images, those a fold could not load added (the
    submission gives them the prior)."""
    out, have, test = plan.out, plan.have, plan.test
    test_frames = [pd.read_csv(out.test_fold(k), dtype={"image_id": str}) for k in have]
    common = test["image_id"][np.logical_and.reduce([test["image_id"].isin(f["image_id"]) for f in test_frames])]
    lost = sorted(set(test["image_id"]) - set(common))
    bad = plan.bad
    if lost:
        bad = pd.concat(
            [bad, pd.DataFrame({"image_id": lost, "reason": "cache file unreadable at predict time"})],
            ignore_index=True,
        )
    full = plan.mode == "full"  # the mixture design's fold-averaged embeddings
    if len(common):
        test_frames = [f[f["image_id"].isin(common)] for f in test_frames]
        write_csv(average_folds(test_frames, cfg.tta.average), out.test)
    if len(common) and full:
        embs = []
        for k in have:
            ids, emb = load_embeddings(out.test_fold_embeddings(k))
            embs.append(pd.DataFrame(emb.astype(np.float32), index=ids).loc[common.to_numpy()].to_numpy())
        save_embeddings(out.test_embeddings, common, np.mean(embs, axis=0))
    elif full:
        save_embeddings(out.test_embeddings, [], np.zeros((0, 0)))
    if not len(common):
        write_csv(wide([], np.zeros((0, len(LABELS)))), out.test)
    return bad


def _write_oof(plan: _Plan) -> int:
    """oof.csv: every fold's OOF predictions one after the other (and, for the mixture design, their embeddings);
    returns its number of rows."""
    out, have = plan.out, plan.have
    oof_frames = [pd.read_csv(out.oof_fold(k), dtype={"image_id": str}) for k in have]
    write_csv(pd.concat(oof_frames, ignore_index=True), out.oof)
    parts = [load_embeddings(out.oof_fold_embeddings(k)) for k in have] if plan.mode == "full" else []
    parts = [p for p in parts if len(p[0])]
    if parts:
        save_embeddings(
            out.oof_embeddings, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        )
    return sum(len(f) for f in oof_frames)


def predict(
    cfg: Config, layout: Layout, runs: str | Path = "runs", via: str | None = None, reads: StackConfig | None = None
) -> Path:
    """TTA predictions of every trained fold; returns `runs/<cfg>/predictions/`.

    `via`: the ensemble `cfg` is a member of (named in the commands of its messages); `reads`: the second stage that
    will read them (the ensemble's, for its members; default: cfg.stack), which decides the embedding files written
    (`embedding_mode`)."""
    start = time.perf_counter()
    plan = _resolve(cfg, layout, runs, via, reads)
    for group in _groups(_load_todo(cfg, plan)):
        _predict_group(group, plan, layout, cfg)
    out = plan.out
    done = freshness.predictions(plan.run, plan.have, cfg.tta)
    if not plan.todo and all(freshness.stale_reason(f, done) is None for f in (out.test, out.oof)):
        log.info(f"predict: {out.test} and {out.oof} are up to date; left as they are")  # later stages stay fresh
        return out.dir
    # fold average / concatenation over every trained fold, from the per-fold files
    bad = _write_test(plan, cfg)
    n_oof = _write_oof(plan)
    write_csv(bad, out.unreadable)
    full = plan.mode == "full"
    manifest.write(out.test, done, also=[out.test_embeddings, out.unreadable] if full else [out.unreadable])
    manifest.write(out.oof, done, also=[out.oof_embeddings] if full and out.oof_embeddings.exists() else [])
    log.info(
        f"predict: {len(plan.test)} test images x {len(plan.have)} fold(s) x {len(cfg.tta.transforms)} TTA, "
        f"{n_oof} OOF images, {len(bad)} unreadable test image(s), {time.perf_counter() - start:.0f}s -> {out.dir}"
    )
    return out.dir


# --- ensembles: each member predicts in its own run folder; the ensemble's predictions/ holds their combination ---


def combine_members(cfg: Config, members: list[Config], layout: Layout, runs: str | Path = "runs") -> Path:
    """Write `runs/<ensemble>/predictions/{test,oof}.csv` (the members combined as `ensemble.combine` says) and
    `ensemble.json` (members' run folders, combination, OOF scores): the first-stage ensemble, which a kernel can
    rebuild from the run folders alone. Every member's predictions must be fresh."""
    import json

    from ..core import ensemble
    from ..core.metrics import read_truth, score_frames

    out = Run.of(runs, cfg.name).predictions
    sources = ensemble.member_predictions(cfg, runs)
    for member, src in zip(members, sources):
        mrun = Run.of(runs, member.name)
        stale = freshness.stale_reason(
            src.test, freshness.predictions(mrun, mrun.finished(selected_folds(member.cv)), member.tta)
        )
        if stale:
            raise UserError(
                f"{src.test} is stale or missing ({stale}); run `make predict CONFIG={cfg.name}` "
                f"(it predicts every member)"
            )
    done = freshness.ensemble(sources, cfg.ensemble)
    if all(freshness.stale_reason(f, done) is None for f in (out.test, out.oof)) and out.ensemble.exists():
        log.info(f"predict: ensemble {out.test} is up to date (same member predictions and combination); reusing")
        return out.dir
    test = [pd.read_csv(s.test, dtype={"image_id": str}) for s in sources]
    oof = [pd.read_csv(s.oof, dtype={"image_id": str}) for s in sources]
    write_csv(ensemble.combine(test, cfg.ensemble), out.test)
    write_csv(ensemble.combine(oof, cfg.ensemble), out.oof)
    bad = [pd.read_csv(s.unreadable, dtype=str) for s in sources if s.unreadable.exists()]
    if bad:
        write_csv(pd.concat(bad, ignore_index=True).drop_duplicates(), out.unreadable)
    scores: dict[str, float | None] = {}
    if layout.train_csv.exists():
        truth = read_truth(layout.train_csv)
        combined = pd.read_csv(out.oof, dtype={"image_id": str})
        for name, frame in [*zip(ensemble.member_names(cfg), oof), ("ensemble", combined)]:
            t = truth[truth["image_id"].isin(combined["image_id"])]
            scores[name] = score_frames(t, frame)["weighted_log_loss"] if len(t) else None
    info = {
        "members": [
            {"name": n, "run": n, "config": str(m)} for n, m in zip(ensemble.member_names(cfg), cfg.ensemble.members)
        ],
        "combine": cfg.ensemble.combine,
        "weights": ensemble.weights(cfg.ensemble, len(sources)).tolist(),
        "cv": {"k": cfg.cv.k, "seed": cfg.cv.seed, "split": cfg.cv.split},
        "oof_weighted_log_loss": scores,
    }
    with atomic_open(out.ensemble) as f:
        json.dump(info, f, indent=1)
    manifest.write(out.oof, done)
    manifest.write(out.test, done, also=[out.ensemble])
    if scores:
        log.info(
            "predict: OOF weighted log loss " + ", ".join(f"{k} {v:.5f}" for k, v in scores.items() if v is not None)
        )
    log.info(f"predict: ensemble of {len(sources)} members ({cfg.ensemble.combine}) -> {out.dir}")
    return out.dir


def predict_ensemble(cfg: Config, members: list[Config], layout: Layout, runs: str | Path = "runs") -> Path:
    """Predict every member (each reuses what is fresh), then combine them."""
    for member in members:
        # the ensemble's second stage reads their embeddings
        predict(member, layout, runs=runs, via=cfg.name, reads=cfg.stack)
    return combine_members(cfg, members, layout, runs)
