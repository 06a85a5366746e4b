"""`infer`'s report.html: per study its table, each subtype's probability along the slices, and its most
suspicious slices in the brain, subdural and bone windows with a Grad-CAM heat map.

Grad-CAM explains one network: the first fold model of the first member (the fold average has no single feature
map), for the subtype with the highest probability on that slice; the page says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.labels import LABELS
from ..report.html import Page
from ..report.plots import COLORS, new_figure, save

log = logging.getLogger(__name__)

L = list(LABELS)
TOP_SLICES = 3
SHOW_WINDOWS = ("brain", "subdural", "bone")
DISCLAIMER = (
    "Research software: these probabilities come from a model trained on a Kaggle competition set. They "
    "are not a diagnosis and must not guide the care of a patient."
)


def profile_plot(g: pd.DataFrame, thresholds: dict, path: Path, title: str) -> Path:
    """Each subtype's probability along the slices of each series of a study."""
    series = list(dict.fromkeys(g["series_id"]))
    fig = new_figure(9, 2.6 * len(series))
    for i, s in enumerate(series):
        ax = fig.add_subplot(len(series), 1, i + 1)
        part = g[g["series_id"] == s].sort_values("slice_rank")
        for c in L:
            ax.plot(part["slice_rank"], part[c], label=c, color=COLORS[c], lw=2 if c == "any" else 1.2)
        ax.axhline(thresholds["slice"]["any"], color="#222222", ls=":", lw=1, label="threshold (any)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("slice (inferior -> superior along the slice normal)")
        ax.set_ylabel("probability")
        ax.set_title(f"{title} / series ...{s[-12:]}", fontsize=9)
        if i == 0:
            ax.legend(fontsize=7, ncol=4, loc="upper left")
    return save(fig, path)


class CamMaker:
    """Grad-CAM of the first fold model of the first member on chosen slices."""

    def __init__(self, bundle, slices: pd.DataFrame):
        from ..data.dataset import SliceDataset
        from ..data.source import DicomSlices
        from ..data.transforms import build_eval_transforms
        from ..models.checkpoint import load_checkpoint

        entry = bundle.info["members"][0]
        fold, path = next(iter(bundle.checkpoints(entry).items()))
        self.net, self.cfg = load_checkpoint(path, map_location="cpu")
        self.net.float()
        self.what = f"{entry['name']} fold {fold}"
        self.ds = SliceDataset(
            slices,
            None,
            self.cfg,
            transform=build_eval_transforms(self.cfg),
            train=False,
            meta=slices,
            read_hu=DicomSlices("/", slices),
        )
        self.index = pd.Index(slices["image_id"])

    def figure(self, image_id: str, label: str, path: Path, title: str) -> Path:
        import cv2

        from ..data.windows import apply_windows, named
        from ..report.gradcam import GradCAM, overlay

        i = int(self.index.get_loc(image_id))
        x, _, _ = self.ds[i]
        with GradCAM(self.net) as cam:
            maps, _ = cam(x[None].float(), L.index(label))
        planes = self.ds.load_planes(i)
        hu = planes[len(planes) // 2].astype(np.float32)
        size = 256
        hu = cv2.resize(hu, (size, size), interpolation=cv2.INTER_LINEAR)
        views = apply_windows(hu, named(SHOW_WINDOWS))
        fig = new_figure(12, 3.3)
        for j, name in enumerate(SHOW_WINDOWS):
            ax = fig.add_subplot(1, 4, j + 1)
            ax.imshow(views[..., j], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{name} window", fontsize=9)
            ax.axis("off")
        ax = fig.add_subplot(1, 4, 4)
        ax.imshow(overlay(views[..., 0], maps[0]))
        ax.set_title(f"Grad-CAM: {label} ({self.what})", fontsize=9)
        ax.axis("off")
        fig.suptitle(title, fontsize=9)
        return save(fig, path)


def infer_report(
    bundle,
    slices: pd.DataFrame,
    series: pd.DataFrame,
    studies: pd.DataFrame,
    skipped: pd.DataFrame,
    out: Path,
    seconds: float,
    cams: bool = True,
) -> Path:
    page = Page(f"ich_kaggle infer: {bundle.name}")
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    th = bundle.thresholds
    about = page.section("About")
    about.note(DISCLAIMER)
    about.text(
        f"Model bundle {bundle.dir} ({bundle.name}, stage: {bundle.stage}; "
        f"{sum(len(m['folds']) for m in bundle.info['members'])} fold model(s)). {len(slices)} slices of "
        f"{len(series)} series in {len(studies)} studies, {seconds:.1f} s. A series' probability is the max over "
        f"its slices; 'positive' means at or above the threshold fixed on the bundle's OOF predictions."
    )
    thr = pd.DataFrame({"slice threshold": th["slice"], "series threshold": th["series"]}).T
    about.table(thr, index=True)
    maker = None
    if cams:
        try:
            maker = CamMaker(bundle, slices.rename(columns={"sop_instance_uid": "image_id", "file": "path"}))
        except Exception as e:  # a report without heat maps beats no report
            log.warning(f"infer: no Grad-CAM ({type(e).__name__}: {e})")
    for n, (study_id, g) in enumerate(slices.groupby("study_id", sort=False)):
        sec = page.section(f"Study {n + 1}: {study_id}")
        srow = studies[studies["study_id"] == study_id]
        shown = srow.melt(id_vars=["study_id"], value_vars=L, var_name="subtype", value_name="probability")
        shown["positive"] = ["yes" if srow[f"{c}_positive"].iloc[0] else "no" for c in shown["subtype"]]
        shown["series threshold"] = [th["series"][c] for c in shown["subtype"]]
        sec.table(shown.drop(columns="study_id"), index=False, caption="Study: max over its series")
        sec.table(
            series[series["study_id"] == study_id][["series_id", "n_slices", *L]],
            index=False,
            caption="Series: max over slices",
        )
        sec.image(profile_plot(g, th, figs / f"study{n + 1}_profile.png", f"study {n + 1}"), out, "profile")
        if maker is not None:
            top = g.sort_values("any", ascending=False).head(TOP_SLICES)
            sec.text(
                f"The {len(top)} slices of highest 'any' probability in the brain, subdural and bone windows, "
                f"and the Grad-CAM heat map ({maker.what}) of the subtype most likely on each."
            )
            for _, r in top.iterrows():
                sub = max(L[1:], key=lambda c: r[c])
                try:
                    p = maker.figure(
                        r["sop_instance_uid"],
                        sub,
                        figs / f"study{n + 1}_rank{int(r['slice_rank'])}.png",
                        f"slice {int(r['slice_rank'])} of series ...{r['series_id'][-12:]}: any "
                        f"{r['any']:.3f}, {sub} {r[sub]:.3f}",
                    )
                    sec.image(p, out, f"slice {int(r['slice_rank'])}")
                except Exception as e:
                    sec.note(f"no Grad-CAM for slice {r['sop_instance_uid']} ({type(e).__name__}: {e})")
    if len(skipped):
        sk = page.section("Skipped inputs")
        sk.table(skipped, index=False)
    return page.write(out / "report.html")
