"""`evaluate`: a model bundle measured on labelled external studies, as paper 004 reports it.

Labels come at the level the external set has them:
- a CSV whose key column is `SOPInstanceUID` (slices), `SeriesInstanceUID` (series) or `StudyInstanceUID`
  (studies), with one 0/1 column per subtype under the competition's names (`any`, `epidural`, ...); subtypes it
  lacks are left out of the table;
- CQ500's `reads.csv` (`name` = `CQ500-CT-<n>`, `R1:ICH`, `R1:IPH`, ... for readers R1-R3): the majority of the
  three readers (2 of 3) per finding, mapped ICH->any, IPH->intraparenchymal, IVH->intraventricular,
  SDH->subdural, EDH->epidural, SAH->subarachnoid; a study is found by its folder's name (`CQ500CT<n> ...`).

Predictions are `infer`'s at the same level (a series / study: the max over its slices). Per subtype: POS and NEG
(counts, share), ACC, PREC, REC at the bundle's thresholds (fixed on its OOF predictions, never tuned here: the
slice threshold for slices, the series threshold for series and studies), AUC and LOG_LOSS; each with a 95 %
bootstrap interval (resampling the labelled units). report.html adds the ROC curves and a calibration plot.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import UserError
from ..core.io import write_csv
from ..core.labels import LABELS
from ..core.metrics import bce

log = logging.getLogger(__name__)

L = list(LABELS)
KEYS = {
    "SOPInstanceUID": ("slice", "sop_instance_uid"),
    "SeriesInstanceUID": ("series", "series_id"),
    "StudyInstanceUID": ("study", "study_id"),
}
CQ500 = {
    "ICH": "any",
    "IPH": "intraparenchymal",
    "IVH": "intraventricular",
    "SDH": "subdural",
    "EDH": "epidural",
    "SAH": "subarachnoid",
}
METRICS = ["ACC", "PREC", "REC", "AUC", "LOG_LOSS"]


def _cq500_key(text: str) -> str | None:
    m = re.search(r"CQ500[-_ ]?CT[-_ ]?(\d+)", text, flags=re.IGNORECASE)
    return f"CQ500CT{int(m.group(1))}" if m else None


def read_labels(path: Path, slices: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """(level, labels frame keyed by the level's column in slices.csv, with 0/1 subtype columns)."""
    try:
        raw = pd.read_csv(path, dtype=str)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({type(e).__name__})") from None
    cols = list(raw.columns)
    if "name" in cols and any(re.fullmatch(r"R[123]:ICH", c) for c in cols):
        return "study", _cq500(path, raw, slices)
    key = next((k for k in KEYS if k in cols), None)
    if key is None:
        raise UserError(
            f"{path}: no key column; expected one of {', '.join(KEYS)} (or CQ500's reads.csv with name, R1:ICH, ...)"
        )
    subtypes = [c for c in L if c in cols]
    if not subtypes:
        raise UserError(f"{path}: no subtype column; expected 0/1 columns named {', '.join(L)}")
    level, column = KEYS[key]
    frame = raw[[key, *subtypes]].rename(columns={key: column}).drop_duplicates(column)
    for c in subtypes:
        bad = ~frame[c].str.strip().isin(["0", "1", "0.0", "1.0"])
        if bad.any():
            raise UserError(
                f"{path}: column {c} must hold 0/1, row {int(np.argmax(bad.to_numpy())) + 2} has "
                f"{frame[c][bad].iloc[0]!r}"
            )
        frame[c] = frame[c].astype(float).astype(int)
    return level, frame


def _cq500(path: Path, raw: pd.DataFrame, slices: pd.DataFrame) -> pd.DataFrame:
    """Majority of three readers per finding; studies matched to reads by the CQ500CT<n> in their folder names."""
    out = pd.DataFrame({"name": raw["name"]})
    for finding, label in CQ500.items():
        readers = [c for c in (f"R{r}:{finding}" for r in (1, 2, 3)) if c in raw.columns]
        if readers:
            votes = raw[readers].apply(pd.to_numeric, errors="coerce").fillna(0).sum(axis=1)
            out[label] = (votes >= (len(readers) // 2 + 1)).astype(int)
    out["key"] = out["name"].map(lambda n: _cq500_key(str(n)))
    keys = {}
    for study, files in slices.groupby("study_id")["file"]:
        found = {k for f in files for k in [_cq500_key(str(Path(f).parent))] if k}
        if len(found) == 1:
            keys[found.pop()] = study
    out["study_id"] = out["key"].map(keys)
    matched = out.dropna(subset=["study_id"])
    if not len(matched):
        raise UserError(
            f"{path}: no study folder named like CQ500CT<n> among the inputs; give the study folders "
            f"(e.g. 'CQ500CT1 CQ500CT1') as they were unpacked"
        )
    return matched[["study_id", *[c for c in L if c in matched.columns]]]


def predictions_at(level: str, slices: pd.DataFrame) -> pd.DataFrame:
    if level == "slice":
        return slices[["sop_instance_uid", *L]]
    key = "series_id" if level == "series" else "study_id"
    return slices.groupby(key, sort=False)[L].max().reset_index()


def _scores(y: np.ndarray, p: np.ndarray, t: float) -> dict:
    from sklearn import metrics as M

    pred = (p >= t).astype(int)
    both = len(np.unique(y)) == 2
    return {
        "ACC": M.accuracy_score(y, pred),
        "PREC": M.precision_score(y, pred, zero_division=0),
        "REC": M.recall_score(y, pred, zero_division=0),
        "AUC": M.roc_auc_score(y, p) if both else np.nan,
        "LOG_LOSS": float(bce(y, np.clip(p, 1e-7, 1 - 1e-7)).mean()),
    }


def _boot_scores(y: np.ndarray, p: np.ndarray, t: float, draws: np.ndarray) -> dict[str, np.ndarray]:
    """The same five metrics for every bootstrap draw (B, n) at once (numpy: 1000 sklearn calls per cell would
    take a minute); AUC as the Mann-Whitney statistic with midranks for ties, NaN for draws with one class."""
    from scipy.stats import rankdata

    yb, pb = y[draws].astype(bool), p[draws]
    pred = pb >= t
    tp = (pred & yb).sum(1)
    pos, n = yb.sum(1), draws.shape[1]
    q = np.clip(pb, 1e-7, 1 - 1e-7)
    ranks = rankdata(pb, axis=1)
    neg = n - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * yb).sum(1) - pos * (pos + 1) / 2) / (pos * neg)
        return {
            "ACC": (pred == yb).mean(1),
            "PREC": np.where(pred.sum(1) > 0, tp / pred.sum(1), 0.0),
            "REC": np.where(pos > 0, tp / pos, 0.0),
            "AUC": np.where((pos > 0) & (neg > 0), auc, np.nan),
            "LOG_LOSS": bce(yb, q).mean(1),
        }


def table(y: pd.DataFrame, p: pd.DataFrame, thresholds: dict, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paper 004's table, one row per subtype present in `y`, with bootstrap 95 % intervals."""
    rows = []
    rng = np.random.default_rng(seed)
    n = len(y)
    draws = rng.integers(0, n, (n_boot, n))
    for c in [c for c in L if c in y.columns]:
        yc, pc = y[c].to_numpy(int), p[c].to_numpy(np.float64)
        point = _scores(yc, pc, thresholds[c])
        boot = _boot_scores(yc, pc, thresholds[c], draws)
        row = {
            "subtype": c,
            "POS": int(yc.sum()),
            "NEG": int(n - yc.sum()),
            "POS_%": 100 * yc.mean(),
            "threshold": thresholds[c],
        }
        for m in METRICS:
            row[m] = point[m]
            ok = np.isfinite(boot[m])
            lo, hi = np.percentile(boot[m][ok], [2.5, 97.5]) if ok.any() else (np.nan, np.nan)
            row[f"{m}_lo"], row[f"{m}_hi"] = lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(t: pd.DataFrame, level: str) -> str:
    lines = [
        f"per {level} ({int(t['POS'].iloc[0] + t['NEG'].iloc[0])} labelled), 95% bootstrap intervals",
        f"{'subtype':<18}{'POS':>11}{'NEG':>11}" + "".join(f"{m:>22}" for m in METRICS),
    ]
    for _, r in t.iterrows():
        pos = f"{r['POS']} ({r['POS_%']:.0f}%)"
        neg = f"{r['NEG']} ({100 - r['POS_%']:.0f}%)"
        cells = "".join(f"{r[m]:>8.3f} [{r[m + '_lo']:.2f}-{r[m + '_hi']:.2f}]" for m in METRICS)
        lines.append(f"{r['subtype']:<18}{pos:>11}{neg:>11}{cells}")
    return "\n".join(lines)


def _plots(y: pd.DataFrame, p: pd.DataFrame, out: Path) -> tuple[Path, Path]:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    from ..report.plots import COLORS, new_figure, save

    subtypes = [c for c in L if c in y.columns]
    fig = new_figure(6, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    for c in subtypes:
        if len(np.unique(y[c])) == 2:
            fpr, tpr, _ = roc_curve(y[c], p[c])
            ax.plot(fpr, tpr, color=COLORS[c], label=c)
    ax.plot([0, 1], [0, 1], color="#999999", ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (recall)")
    ax.set_title("ROC")
    ax.legend(fontsize=8)
    roc = save(fig, out / "roc.png")
    fig = new_figure(6, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    for c in subtypes:
        frac, mean = calibration_curve(y[c], p[c], n_bins=5, strategy="quantile")
        ax.plot(mean, frac, marker="o", color=COLORS[c], label=c)
    ax.plot([0, 1], [0, 1], color="#999999", ls=":")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed fraction positive")
    ax.set_title("calibration (quantile bins)")
    ax.legend(fontsize=8)
    return roc, save(fig, out / "calibration.png")


def evaluate(bundle, labels_csv: Path, paths: list[Path], out: Path, n_boot: int = 1000) -> pd.DataFrame:
    """Infer on `paths`, join the labels, print and write `out/evaluation.csv` and `out/report.html`."""
    from ..bundle import Bundle, load
    from ..report.html import Page
    from .infer import infer

    out = Path(out)
    b = bundle if isinstance(bundle, Bundle) else load(bundle)
    infer(b, paths, out, report=False)
    slices = pd.read_csv(out / "slices.csv", dtype={"sop_instance_uid": str, "series_id": str, "study_id": str})
    level, labels = read_labels(Path(labels_csv), slices)
    key = labels.columns[0]
    preds = predictions_at(level, slices)
    both = labels.merge(preds, on=key, suffixes=("", "_p"))
    if not len(both):
        raise UserError(
            f"{labels_csv}: none of its {len(labels)} {level}(s) is among the inputs' {len(preds)}; "
            f"check that the labels and the DICOMs are of the same studies"
        )
    missing = len(labels) - len(both)
    subtypes = [c for c in L if c in labels.columns]
    y = both[subtypes]
    p = both[[f"{c}_p" for c in subtypes]].set_axis(subtypes, axis=1)
    th = b.thresholds["slice" if level == "slice" else "series"]
    t = table(y, p, th, n_boot=n_boot)
    write_csv(t, out / "evaluation.csv")
    text = format_table(t, level)
    print(text)
    if missing:
        print(f"note: {missing} labelled {level}(s) of {labels_csv} are not among the inputs and were left out")
    roc, cal = _plots(y, p, out)
    page = Page(f"ich_kaggle evaluate: {b.name} on {Path(labels_csv).name}")
    sec = page.section("Per-subtype table")
    sec.text(
        f"{len(both)} labelled {level}(s); predictions of the bundle's stage '{b.stage}' "
        f"({'slice probabilities' if level == 'slice' else 'max over the slices'}); thresholds fixed on the "
        f"bundle's OOF predictions. Intervals: 95 % bootstrap over the {level}s ({n_boot} resamples)."
    )
    shown = t.copy()
    for m in METRICS:
        shown[m] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(t[m], t[f"{m}_lo"], t[f"{m}_hi"])]
    shown["POS"] = [f"{a} ({s:.0f}%)" for a, s in zip(t["POS"], t["POS_%"])]
    shown["NEG"] = [f"{a} ({100 - s:.0f}%)" for a, s in zip(t["NEG"], t["POS_%"])]
    sec.table(shown[["subtype", "POS", "NEG", *METRICS, "threshold"]], index=False)
    if missing:
        sec.note(f"{missing} labelled {level}(s) were not among the inputs and were left out.")
    page.section("ROC curves").image(roc, out, "ROC")
    page.section("Calibration").image(cal, out, "calibration")
    page.write(out / "report.html")
    log.info(f"evaluate: {len(both)} {level}(s) -> {out / 'evaluation.csv'}, {out / 'report.html'}")
    return t
