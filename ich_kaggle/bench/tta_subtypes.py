"""`make bench --what tta-subtypes`: do the TTA views and the head crop's margin cost the rim subtypes (issue 26)?

Epidural and subdural bleeds lie against the skull, at the edge of the head crop (`data.dataset.head_bbox`: the
pixels above -500 HU plus `data.crop_margin` of the box on each side, then the square around it). The `shift` views move
the image by 5 % of its size and `scale` zooms 10 % into its centre (`predict/tta.py`): where that is more than the
margin, they cut the head's edge off. Two checks, printed as `name: value` lines:

- pixels (no model; the robust part): over every train slice of the real mini set, at the shipped GPU configs'
  512 px, the share of head pixels (above -500 HU: what the crop box is made from, headrest and table included), of
  skull pixels (a closed ring at or above 300 HU) and of intracranial pixels (0-100 HU enclosed by it: where
  epidural and subdural bleeds lie) that each view leaves out of the image at each margin, and the share
  of slices where it leaves out any skull or intracranial pixel;
- OOF: `tiny` (real pretrained Lite0 weights, CPU, 64 px, 5 patient folds, 2 epochs, as shipped) trained at each
  margin, each fold's held-out slices predicted at that margin with each view alone and each view list a shipped
  config uses: per-subtype log loss (epidural, subdural, any) and the weighted loss, with the count of positive
  slices per subtype and a study-level bootstrap of each difference from [identity, hflip] at the default margin.
  The mini set is 18 studies with 6 subdural slices (one study) and no epidural one: read the OOF figures as a check
  that nothing breaks, not as the size of an effect.

The folds train into .cache/bench-tta-subtypes/runs_margin<m>/ (a rerun reuses them; the first run trains 15 folds,
~7 CPU-minutes, ~15 minutes on a shared 2-core machine). Needs the real mini set: on a synthetic competition it says
so and stops.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np

from ..core import config
from ..core.labels import LABELS

MARGINS = (0.0, 0.04, 0.08)  # the default `data.crop_margin` (4 %) and one step either side
VIEWS = ("identity", "hflip", "shift", "shift_back", "scale")  # every view a model trained without transpose may use
BASELINE = ("identity", "hflip")  # the CPU configs' views: what the others are compared with
PIXEL_SIZE = 512  # the shipped configs that use shift / scale run at 480-512 px
SKULL_HU = 300.0  # bone; the rim bleeds lie just inside it
BLOOD_HU = (0.0, 100.0)  # brain and fresh blood: the intracranial tissue a rim bleed is part of
KINDS = ("head", "skull", "intracranial")  # the masks of `rim_masks`
SUBTYPES = ("epidural", "subdural", "any")
BOOTSTRAP = 200
WORK = Path(".cache") / "bench-tta-subtypes"
TRAIN = ["data.num_workers=0"]  # tiny as shipped (5 folds, 2 epochs, 64 px); one process


def _tag(margin: float) -> str:
    return f"margin{round(margin * 100)}"


def shipped_view_lists() -> dict[str, list[str]]:
    """The distinct `tta.transforms` of the shipped configs that a model without transpose training may use."""
    lists: dict[str, list[str]] = {}
    for name in config.available():
        views = config.load(name).tta.transforms
        if set(views) <= set(VIEWS):
            lists.setdefault("views_" + "_".join(views), list(views))
    return lists


def visible_box(view: str, size: int) -> tuple[float, float, float, float]:
    """(y0, y1, x0, x1): the source pixels (inclusive bounds, pixel units) that the view still shows.

    The view is applied to images of the pixels' own coordinates (+1, so 0 marks a pixel the view brought in from
    outside); every registered view shows a rectangle of its input (shifted, zoomed, flipped or transposed), so the
    range of the coordinates it shows is that rectangle, half a pixel widened for the zoom's interpolation."""
    import torch

    from ..core.registry import TTA

    grid = torch.arange(size, dtype=torch.float32) + 1.0
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    out = TTA.get(view, "tta.transforms")(torch.stack([ys, xs])[None])[0]
    shown = (out[0] > 0) & (out[1] > 0)
    y, x = out[0][shown], out[1][shown]
    return float(y.min()) - 1.5, float(y.max()) - 0.5, float(x.min()) - 1.5, float(x.max()) - 0.5


def _outside(mask: np.ndarray, box: tuple[float, float, float, float]) -> int:
    y0, y1, x0, x1 = box
    rows = np.arange(mask.shape[0])
    cols = np.arange(mask.shape[1])
    keep_r = (rows >= y0) & (rows <= y1)
    keep_c = (cols >= x0) & (cols <= x1)
    return int(mask.sum() - mask[np.ix_(keep_r, keep_c)].sum())


def rim_masks(img) -> dict[str, np.ndarray]:
    """Boolean masks of one slice in HU: `head` (above -500 HU: what the crop box is made from, with the headrest
    and table where they are in the image), `skull` (of the three largest 8-connected components at or above 300 HU,
    the one that encloses the most 0-100 HU pixels: a closed skull ring, not the table's arc), `intracranial` (the
    0-100 HU pixels it encloses: brain and blood, where epidural and subdural bleeds lie). Slices without a closed
    ring (skull base, vertex) have neither."""
    import cv2
    from scipy import ndimage

    from ..data.dataset import AIR_HU

    lo, hi = BLOOD_HU
    soft = (img >= lo) & (img <= hi)
    n, lab, stats, _ = cv2.connectedComponentsWithStats((img >= SKULL_HU).astype(np.uint8), connectivity=8)
    skull = np.zeros(img.shape, bool)
    inside = np.zeros(img.shape, bool)
    for c in 1 + np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][:3]:
        x, y, w, h = (int(v) for v in stats[c, :4])  # left, top, width, height
        comp = lab[y : y + h, x : x + w] == c
        enclosed = ndimage.binary_fill_holes(comp) & ~comp & soft[y : y + h, x : x + w]
        if enclosed.sum() > inside.sum():
            skull[:], inside[:] = False, False
            skull[y : y + h, x : x + w], inside[y : y + h, x : x + w] = comp, enclosed
    return {"head": img > AIR_HU, "skull": skull, "intracranial": inside}


def pixel_check(layout, ids: list[str], margins=MARGINS, views=VIEWS, size: int = PIXEL_SIZE) -> dict[str, float]:
    """Share of head, skull and intracranial pixels each view leaves out of the model's input at each margin, and the
    share of slices where it leaves out any skull or intracranial pixel (see the module)."""
    import cv2

    from ..data import cache
    from ..data.dataset import crop, head_bbox, square_box

    boxes = {v: visible_box(v, size) for v in views}
    total = {(m, k): 0 for m in margins for k in KINDS}
    cut = {(m, v, k): 0 for m in margins for v in views for k in KINDS}
    slices_cut = {(m, v, k): 0 for m in margins for v in views for k in KINDS}
    for image_id in ids:
        hu = cache.load_hu(layout, image_id)
        full = {k: v.astype(np.float32) for k, v in rim_masks(hu.astype(np.float32)).items()}  # once per slice
        for m in margins:
            # the production crop (`data.crop_square` default) of each mask, resized as the model's input is
            box = square_box(head_bbox(hu, margin=m))
            masks = {
                k: cv2.resize(crop(mask, box, fill=0.0), (size, size), interpolation=cv2.INTER_LINEAR) >= 0.5
                for k, mask in full.items()
            }
            for k, mask in masks.items():
                total[m, k] += int(mask.sum())
                for v in views:
                    n = _outside(mask, boxes[v])
                    cut[m, v, k] += n
                    slices_cut[m, v, k] += n > 0
    out = {}
    for m in margins:
        for v in views:
            for k in KINDS:
                out[f"rim_{_tag(m)}_{v}_{k}_pixels_cut"] = cut[m, v, k] / max(1, total[m, k])
            for k in KINDS[1:]:
                out[f"rim_{_tag(m)}_{v}_slices_with_{k}_cut"] = slices_cut[m, v, k] / max(1, len(ids))
    return out


def _prepare(layout):
    """`tiny` as the bench trains it, and the fold table, with the meta table and the HU cache made."""
    from ..data import folds, preprocess

    cfg = config.load("tiny", TRAIN)
    with contextlib.redirect_stdout(io.StringIO()):
        table = folds.fold_table(layout, cfg.cv)
        preprocess.ensure(layout)
    return cfg, table.reset_index(drop=True)


def _train(cfg, layout, runs: Path, margin: float) -> None:
    """`cfg`'s folds trained at head-crop margin `margin` (`data.crop_margin`, which each checkpoint records), into a
    folder of that margin's own."""
    from .. import train

    cfg = copy.deepcopy(cfg)
    cfg.data.crop_margin = margin
    with contextlib.redirect_stdout(io.StringIO()):
        for fold in config.selected_folds(cfg.cv):
            train.train_fold(cfg, layout, fold, runs=runs)


def view_predictions(layout, runs: Path, cfg, table, views=VIEWS) -> dict[str, np.ndarray]:
    """{view: (N, 6) OOF probabilities in `table` order}: each fold's best.pt on its own held-out slices, cropped at
    the margin it was trained with (its recorded `data.crop_margin`)."""
    import torch

    from ..core.layout import Run
    from ..data.dataset import SliceDataset
    from ..data.meta import load_meta
    from ..data.transforms import build_eval_transforms
    from ..models.checkpoint import load_checkpoint
    from ..predict.tta import tta_forward

    meta = load_meta(layout)
    run = Run.of(runs, cfg.name)
    out = {v: np.full((len(table), len(LABELS)), np.nan) for v in views}
    for fold in config.selected_folds(cfg.cv):
        net, fcfg = load_checkpoint(run.fold(fold).best)
        rows = np.flatnonzero(table["fold"].to_numpy() == fold)
        frame = table.iloc[rows][["image_id"]]
        ds = SliceDataset(frame, layout, fcfg, transform=build_eval_transforms(fcfg), meta=meta)
        loader = torch.utils.data.DataLoader(ds, batch_size=fcfg.tta.batch_size, shuffle=False)
        got: dict[str, list[np.ndarray]] = {v: [] for v in views}
        with torch.inference_mode():
            for x, _, _ in loader:
                for v in views:
                    got[v].append(tta_forward(net, x, [v], want_features=False)[0].numpy())
        for v in views:
            out[v][rows] = np.concatenate(got[v])
    return out


def _losses(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from ..core import metrics

    per = metrics.per_label_log_loss(y, p)
    return {**{s: per[s] for s in SUBTYPES}, "weighted": metrics.weighted_log_loss(y, p)}


def _bootstrap_sd(y, p, base, groups: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Standard deviation over study-level resamples of (loss of p - loss of base), per subtype and weighted."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    index = {g: np.flatnonzero(groups == g) for g in uniq}
    diffs: dict[str, list[float]] = {}
    for _ in range(BOOTSTRAP):
        rows = np.concatenate([index[g] for g in rng.choice(uniq, len(uniq))])
        a, b = _losses(y[rows], p[rows]), _losses(y[rows], base[rows])
        for k in a:
            diffs.setdefault(k, []).append(a[k] - b[k])
    return {k: float(np.std(v)) for k, v in diffs.items()}


def bench_tta_subtypes(data: Path) -> None:
    from .. import bench
    from ..core.labels import read_labels
    from ..core.layout import Layout
    from ..data.meta import load_meta

    from ..data import synth

    if (data / synth.MARKER).exists() or not (data / "stage_2_train").is_dir():
        where = f"{data} is synthetic" if (data / synth.MARKER).exists() else f"{data} has no stage_2_train/"
        print(
            f"tta-subtypes: skipped: needs the real mini set ({where}; {bench.SHARED_MINI} or --mini <folder>): a "
            f"synthetic competition's lesions do not lie against a skull as epidural and subdural bleeds do"
        )
        return
    layout = Layout.of(data, WORK / "work")
    cfg, table = _prepare(layout)
    default = cfg.data.crop_margin
    meta = load_meta(layout).set_index("image_id")
    ids = table["image_id"].astype(str).tolist()

    for name, value in pixel_check(layout, ids).items():
        print(f"{name}: {value:.5f}")

    labels = read_labels(layout.train_csv).set_index("image_id").loc[ids, list(LABELS)].to_numpy(np.float64)
    studies = meta.loc[ids, "study_id"].astype(str).to_numpy()
    for s in SUBTYPES:
        pos = labels[:, list(LABELS).index(s)] > 0
        print(f"positives_{s}_slices: {int(pos.sum())}")
        print(f"positives_{s}_studies: {len(set(studies[pos]))}")
    print(f"oof_slices: {len(ids)}")
    print(f"oof_studies: {len(set(studies))}")

    lists = {f"view_{v}": [v] for v in VIEWS} | shipped_view_lists()
    base = ref = None
    for m in sorted(MARGINS, key=lambda m: m != default):  # the default first: the baseline is made there
        runs = WORK / f"runs_{_tag(m)}"
        _train(cfg, layout, runs, m)
        probs = view_predictions(layout, runs, cfg, table)
        if base is None:
            base = np.mean([probs[v] for v in BASELINE], axis=0)
            ref = _losses(labels, base)
        for name, views in lists.items():
            p = np.mean([probs[v] for v in views], axis=0)
            losses = _losses(labels, p)
            for k, value in losses.items():
                print(f"oof_{_tag(m)}_{name}_{k}_log_loss: {value:.5f}")
            if m == default and tuple(views) == BASELINE:
                continue
            sd = _bootstrap_sd(labels, p, base, studies)
            for k in ("epidural", "subdural", "weighted"):
                print(f"oof_{_tag(m)}_{name}_{k}_minus_baseline: {losses[k] - ref[k]:+.5f} (bootstrap sd {sd[k]:.5f})")
