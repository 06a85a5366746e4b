"""Offline Kaggle inference kernel, inside the kernel: the model bundle on the competition's test folder.

The model dataset IS the model bundle (`ich_kaggle.bundle`, written by `bundle.export`): the kernel finds it at any
depth under /kaggle/input, checks it (`bundle.load`: format, files, checksums), groups the test DICOMs into ordered
series (`data.studies.collect`, the grouping of `infer`) and runs the bundle's chosen pipeline through
`apply.infer.run_pipeline`, then writes and validates `submission.csv` in the competition's format.

A Kaggle session ends at 12 hours, so the kernel keeps its progress in /kaggle/working (Kaggle's output) as it goes:

    /kaggle/working/ich_kaggle_predictions/test_slices.csv.gz    the grouped test slices (paths relative to the test
    /kaggle/working/ich_kaggle_predictions/test_slices.json      folder) + what they were made from (the file listing)
    /kaggle/working/ich_kaggle_predictions/<member>__fold<k>.npz  one fold model's test probabilities, written
    /kaggle/working/ich_kaggle_predictions/<member>__fold<k>.json atomically as it finishes; its manifest names the
                                                                 bundle (sha256 of bundle.json), the test slices'
                                                                 digest and the .npz's sha256

At start it adopts such files from previous outputs attached to it (a previous version of itself, or other part
kernels: /kaggle/input/notebooks/<owner>/<slug>/), but only those made from the same bundle and the same test
slices; anything else is recomputed. A kernel may run only some members and folds (`members`, `folds`: the
`--members`/`--folds` of `make kernel`); it writes the submission once every member's every fold is at hand,
computed or adopted, so a last small kernel attaching the parts' outputs (or `make kernel-finish` locally on
fetched outputs) makes it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..core.errors import UserError
from ..core.io import atomic_open, atomic_path
from ..core.labels import LABELS
from ..bundle import sha256  # the one file digest (the bundle checks its files with it too)
from ..core.layout import COMPETITION

log = logging.getLogger(__name__)

SAMPLE_NAME = "stage_2_sample_submission.csv"
TEST_DIR = "stage_2_test"
TRAIN_LABELS = "stage_2_train.csv"
PREDICTIONS = "ich_kaggle_predictions"  # the folder of per-fold test predictions in /kaggle/working
SLICES = "test_slices.csv.gz"
SLICES_INFO = "test_slices.json"
FORMAT = 1  # of the per-fold prediction files and their manifests
STOP_ENV = "ICH_STOP_AFTER_FOLDS"  # stop (resumably) after this many fold predictions: tests and time-boxed runs
SUBMISSION = "submission.csv"


def slugify(text: str) -> str:
    """Kaggle's URL slug: lower case, runs of other characters become one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --- finding the inputs ------------------------------------------------------------------------------------------
def find_test_competition(root: str | Path) -> Path:
    """The competition folder with the sample submission and the test images."""
    from ..core import kaggle_input

    return kaggle_input.find(
        root,
        lambda p, files: SAMPLE_NAME in files and (p / TEST_DIR).is_dir(),
        f"no {SAMPLE_NAME} beside a {TEST_DIR}/ folder under {root}; add the competition "
        f"'{COMPETITION}' as a data source of the kernel",
    )


def find_bundle(root: str | Path, config_name: str | None = None) -> Path:
    """The model bundle (the folder holding bundle.json) of `config_name` under the input root, at any depth."""
    from ..bundle import INDEX
    from ..core import kaggle_input

    found = kaggle_input.find_all(root, kaggle_input.holding(INDEX))
    if config_name is not None:

        def name_of(folder: Path) -> str | None:
            try:
                return json.loads((folder / INDEX).read_text()).get("name")
            except (OSError, ValueError, AttributeError):
                return None

        matching = [f for f in found if name_of(f) == config_name]
        if found and not matching:
            raise UserError(
                f"the model bundles under {root} hold other configs than '{config_name}'; attach "
                f"ich-kaggle-model-{slugify(config_name)} (make kernel-datasets CONFIG={config_name})"
            )
        found = matching
    if not found:
        raise UserError(
            f"no model bundle ({INDEX}) under {root}; attach the model dataset built by `make kernel-datasets`"
        )
    return found[0]


def find_previous(root: str | Path) -> list[Path]:
    """Prediction folders of earlier kernels attached as sources (their outputs), nearest the root first."""
    from ..core import kaggle_input

    if not Path(root).is_dir():
        return []
    return kaggle_input.find_all(root, kaggle_input.holding(SLICES_INFO))


# --- identities: the bundle and the test slices -------------------------------------------------------------------
def bundle_id(b) -> str:
    """The bundle's identity: the sha256 of its bundle.json, which holds the sha256 of every file it lists; for a
    bundle assembled in memory (the from-folds kernel), of its index as JSON with each file named by its sha256
    instead of its mount path, so that the kernel's next version, whose inputs may be mounted elsewhere, knows it."""
    from ..bundle import INDEX

    index = b.dir / INDEX
    if index.is_file():
        return sha256(index)
    files = b.info["files"]
    members = [
        dict(m, weights=[files[w]["sha256"] for w in m["weights"]], config=sha256(Path(m["config"])))
        for m in b.info["members"]
    ]
    content = dict(b.info, members=members, files=sorted(f["sha256"] for f in files.values()))
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def listing(test_dir: Path) -> str:
    """A digest of the test folder's file names and sizes: cheap (no file is opened) and enough to tell another
    test set or a changed file set."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(test_dir, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(test_dir).as_posix()
        for name in sorted(filenames):
            h.update(f"{rel}/{name}\t{os.stat(os.path.join(dirpath, name)).st_size}\n".encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def _read_slices(folder: Path, info: dict | None = None) -> pd.DataFrame | None:
    """The slices file of `folder` when it is whole (the sha256 of its bytes is the digest its manifest names)."""
    try:
        if info is not None and sha256(folder / SLICES) != info.get("digest"):
            return None
        return pd.read_csv(folder / SLICES, dtype={"image_id": str, "study_id": str, "series_id": str})
    except (OSError, ValueError, EOFError):
        return None


def test_slices(test_dir: Path | None, store: Path, previous: list[Path]) -> tuple[pd.DataFrame, str]:
    """(the test slices grouped into ordered series, with absolute paths; their digest).

    Adopted from this kernel's working folder or an attached previous output when they were made from the same
    file listing by the same ich_kaggle, else made by a header scan of the test DICOMs (`studies.collect`) and kept
    in `store`. Without a test folder (combining fetched predictions locally) the slices the predictions were made
    on are taken from `previous` as they are: no image is read then."""
    from ..data import studies

    want = {"listing": listing(test_dir), "ich_kaggle": __version__} if test_dir is not None else None
    for folder in [store, *previous]:
        info = _read_json(folder / SLICES_INFO)
        if not info or info.get("format") != FORMAT:
            continue
        if want is not None and {k: info.get(k) for k in want} != want:
            log.info(f"kernel: {folder / SLICES} was made from another test folder or ich_kaggle; not adopted")
            continue
        frame = _read_slices(folder, info)
        if frame is None:
            log.info(f"kernel: {folder / SLICES} is damaged or edited (digest differs); not adopted")
            continue
        if folder != store:
            _copy_slices(folder, store)
            log.info(f"kernel: test slices adopted from {folder} (no header scan)")
        return _absolute(frame, test_dir), info["digest"]
    if test_dir is None:
        raise UserError(
            f"no {SLICES_INFO} in the prediction folders given and no {TEST_DIR}/ to scan; pass the kernels' "
            f"fetched outputs (make kernel-output) or the competition folder"
        )
    log.info(f"kernel: grouping the DICOMs of {test_dir} into series (header scan)")
    col = studies.collect([test_dir])
    frame = col.slices.copy()
    frame["path"] = [Path(p).relative_to(test_dir.resolve()).as_posix() for p in frame["path"]]
    frame = frame.reset_index(drop=True)
    store.mkdir(parents=True, exist_ok=True)
    with atomic_path(store / SLICES) as tmp:  # the same bytes from the same scan (no time or name in the header)
        tmp.write_bytes(gzip.compress(frame.to_csv(index=False).encode(), mtime=0))
    frame = _read_slices(store)  # as a later version will read it
    digest = sha256(store / SLICES)
    _write_json(store / SLICES_INFO, {"format": FORMAT, **want, "digest": digest, "skipped": len(col.skipped)})
    if len(col.skipped):
        log.info(
            f"kernel: {len(col.skipped)} test file(s) skipped (they get the training prior), e.g. "
            f"{col.skipped.iloc[0]['path']}: {col.skipped.iloc[0]['reason']}"
        )
    return _absolute(frame, test_dir), digest


def _copy_slices(src: Path, store: Path) -> None:
    store.mkdir(parents=True, exist_ok=True)
    for name in (SLICES, SLICES_INFO):
        with atomic_path(store / name) as tmp:
            shutil.copyfile(src / name, tmp)


def _absolute(frame: pd.DataFrame, test_dir: Path | None) -> pd.DataFrame:
    out = frame.copy()
    if test_dir is not None:
        root = test_dir.resolve()
        out["path"] = [str(root / p) for p in out["path"]]
    return out


# --- per-fold predictions in the working folder ------------------------------------------------------------------
class FoldStore:
    """Per-member, per-fold test predictions in `folder`, each with a manifest naming what made it; adopted from
    `previous` folders (attached outputs) when made from the same bundle and test slices."""

    def __init__(self, folder: Path, bundle: str, slices: str, previous: list[Path] = ()):
        self.folder, self.previous = folder, [p for p in previous if p.resolve() != folder.resolve()]
        self.key = {"format": FORMAT, "bundle": bundle, "slices": slices}
        self.adopted: list[str] = []

    @staticmethod
    def stem(member: str, fold: int) -> str:
        return f"{member}__fold{fold}"

    def _valid(self, folder: Path, stem: str) -> bool:
        info = _read_json(folder / f"{stem}.json")
        if not info or {k: info.get(k) for k in self.key} != self.key:
            return False
        data = folder / f"{stem}.npz"
        return data.is_file() and data.stat().st_size == info.get("bytes") and sha256(data) == info.get("sha256")

    def have(self, member: str, fold: int) -> bool:
        """Whether this fold's predictions are here, adopting them from a previous output first if needed."""
        stem = self.stem(member, fold)
        if self._valid(self.folder, stem):
            return True
        if (self.folder / f"{stem}.json").exists():
            log.info(
                f"kernel: {self.folder / stem}.npz was made from another bundle or test set, or is damaged; "
                f"recomputing it"
            )
        for folder in self.previous:
            if self._valid(folder, stem):
                self.folder.mkdir(parents=True, exist_ok=True)
                for ext in (".npz", ".json"):  # the data first: the manifest marks it whole
                    with atomic_path(self.folder / f"{stem}{ext}") as tmp:
                        shutil.copyfile(folder / f"{stem}{ext}", tmp)
                self.adopted.append(stem)
                log.info(
                    f"kernel: {member} fold {fold}: adopted from {folder} (same bundle and test slices; not recomputed)"
                )
                return True
            if (folder / f"{stem}.json").exists():
                log.info(f"kernel: {folder / stem}.npz not adopted: made from another bundle or test set, or damaged")
        return False

    def put(self, member: str, fold: int, probs: pd.DataFrame, embs: pd.DataFrame | None, lost: list) -> Path:
        """Keep one fold model's output: its probabilities and, when the bundle's second stage reads them, its
        embeddings as `predict` made them (same dtype, so the stack sees the same numbers after a resume)."""
        stem = self.stem(member, fold)
        self.folder.mkdir(parents=True, exist_ok=True)
        data = self.folder / f"{stem}.npz"
        extra = {} if embs is None else {"emb": embs.to_numpy(), "emb_id": np.asarray(embs.index, dtype=str)}
        with atomic_open(data, "wb") as f:
            np.savez(
                f,
                image_id=np.asarray(probs["image_id"], dtype=str),
                probs=probs[list(LABELS)].to_numpy(np.float64),
                lost=np.asarray([str(i) for i in lost], dtype=str),
                **extra,
            )
        _write_json(
            self.folder / f"{stem}.json",
            {
                **self.key,
                "member": member,
                "fold": fold,
                "images": int(len(probs)),
                "sha256": sha256(data),
                "bytes": data.stat().st_size,
                "ich_kaggle": __version__,
            },
        )
        return data

    def get(self, entry: dict, fold: int) -> tuple[pd.DataFrame, pd.DataFrame | None, list]:
        """`apply.infer.run_pipeline`'s fold_predictions: what `put` kept."""
        from ..predict.stage import wide

        with np.load(self.folder / f"{self.stem(entry['name'], fold)}.npz", allow_pickle=False) as z:
            embs = pd.DataFrame(z["emb"], index=z["emb_id"].astype(str).astype(object)) if "emb" in z else None
            return wide(z["image_id"].astype(str), z["probs"]), embs, [str(i) for i in z["lost"]]


# --- the kernel --------------------------------------------------------------------------------------------------
def _selected(b, members: list[str] | None, folds: list[int] | None) -> list[tuple[dict, int]]:
    names = [m["name"] for m in b.info["members"]]
    unknown = [m for m in members or [] if m not in names]
    if unknown:
        raise UserError(f"member(s) {unknown} are not in the bundle {b.dir} (it holds {names}); fix --members")
    return [
        (entry, k)
        for entry in b.info["members"]
        if members is None or entry["name"] in members
        for k in entry["folds"]
        if folds is None or k in folds
    ]


def run_kernel(
    model,
    competition: str | Path | None,
    working: str | Path,
    previous: list[Path] = (),
    members: list[str] | None = None,
    folds: list[int] | None = None,
    scratch: str | Path | None = None,
    sample: str | Path | None = None,
) -> Path | None:
    """The bundle `model` (a folder, or a loaded `Bundle`) on the competition's test folder; the path of the
    validated submission.csv in `working`, or None when this kernel ran only a part (or was stopped) and folds are
    still missing.

    `previous`: prediction folders of attached earlier outputs to adopt from. `members`/`folds`: compute only
    these (None: all). `competition` None (combining fetched predictions locally): nothing is predicted, the test
    slices come from `previous`, `sample` names the sample submission."""
    from ..apply.infer import predict_fold, run_pipeline
    from ..bundle import Bundle, load

    b = model if isinstance(model, Bundle) else load(model)
    working = Path(working)
    competition = Path(competition) if competition is not None else None
    test_dir = competition / TEST_DIR if competition is not None else None
    store_dir = working / PREDICTIONS
    slices, digest = test_slices(test_dir, store_dir, list(previous))
    store = FoldStore(store_dir, bundle_id(b), digest, list(previous))
    todo = _selected(b, members, folds) if competition is not None else []
    stop_after = int(os.environ.get(STOP_ENV) or 0)
    made = 0
    if todo:
        from ..data.dataset import loader_workers

        log.info(f"kernel: {len(todo)} fold model(s) to run, {loader_workers(-1)} loader workers (data.num_workers=-1)")
    for entry, k in todo:
        if store.have(entry["name"], k):
            continue
        mcfg = b.member_config(entry)
        mcfg.data.num_workers = -1  # this machine's CPUs (Kaggle: 4), not the training machine's worker count
        probs, embs, lost = predict_fold(b, entry, k, slices, cfg=mcfg)
        path = store.put(entry["name"], k, probs, embs, lost)
        made += 1
        log.info(f"kernel: {entry['name']} fold {k}: {len(probs)} slices predicted -> {path}")
        if stop_after and made >= stop_after:
            log.info(
                f"kernel: stopping after {made} fold(s) (${STOP_ENV}); a new version attaching this output resumes"
            )
            return None
    missing = [f"{m['name']} fold {k}" for m in b.info["members"] for k in m["folds"] if not store.have(m["name"], k)]
    if missing:
        if competition is None:
            raise UserError(
                f"the prediction folders given lack {', '.join(missing)} (made from this bundle and test set); "
                f"fetch the output of the kernel that predicts them (make kernel-output SLUG=...)"
            )
        log.info(
            f"kernel: part done; {len(missing)} fold prediction(s) still missing ({', '.join(missing)}): a kernel "
            f"attaching this output and the other parts' (make kernel ATTACH=...) or `make kernel-finish` makes the "
            f"submission"
        )
        return None
    log.info(
        f"kernel: {b.name}: the bundle's {b.stage.replace('_', ' ')} over "
        + ", ".join(f"{m['name']} folds {m['folds']}" for m in b.info["members"])
        + (f", combined ({b.info['ensemble']['combine']})" if b.info.get("ensemble") else "")
    )
    chosen, _, lost = run_pipeline(b, slices, fold_predictions=store.get)
    sample = Path(sample) if sample is not None else competition / SAMPLE_NAME
    labels = sample.with_name(TRAIN_LABELS)
    return write_submission(chosen, sample, labels, working / SUBMISSION, Path(scratch or working))


def _prior(labels: Path) -> np.ndarray | None:
    """The training label means (the best constant guess) for test images without a prediction, as `make submit`."""
    from ..core.metrics import read_truth

    if not labels.is_file():
        return None
    return read_truth(labels)[list(LABELS)].to_numpy(np.float64).mean(axis=0)


def write_submission(pred: pd.DataFrame, sample: Path, labels: Path, final: Path, scratch: Path) -> Path:
    """`final` in the competition's format (`submit.write_submission`: six rows per sample image, its order), the
    sample's images without a prediction (unreadable or skipped files) given the training prior; validated."""
    from ..submit import stage as submission
    from ..submit.stage import check_sample
    from ..core.metrics import split_ids

    sample_df = check_sample(sample, pred)
    images = pd.unique(split_ids(sample_df["ID"])[0])
    lacking = pd.Index(images).difference(pd.Index(pred["image_id"].astype(str)), sort=False)
    if len(lacking):
        prior = _prior(labels)
        if prior is None:
            raise UserError(
                f"{len(lacking)} test images have no prediction (e.g. {lacking[0]}) and {labels} is missing, so "
                f"there is no training prior to fill them with; attach the whole competition"
            )
        log.info(f"kernel: {len(lacking)} test image(s) without a prediction get the training prior")
        fill = pd.DataFrame(np.broadcast_to(prior, (len(lacking), len(LABELS))), columns=list(LABELS))
        fill.insert(0, "image_id", np.asarray(lacking, dtype=object))
        pred = pd.concat([pred, fill], ignore_index=True)
    written = submission.write_submission(pred, sample, scratch / "submission" / SUBMISSION)
    with atomic_path(final) as tmp:
        shutil.copyfile(written, tmp)
    problems = submission.validate_file(sample, final)
    if problems:
        raise UserError(f"{final} failed validation: {problems[0]} ({len(problems)} problem(s)); see the log above")
    log.info(f"kernel: wrote {final} ({len(pred)} images, valid)")
    return final


def combine_local(model: str | Path, outputs: list[Path], sample: Path, out: Path) -> Path:
    """`make kernel-finish`: the submission from fetched kernel outputs (their per-fold predictions), locally,
    without the test images: every fold of the bundle must be among them, made from this bundle."""
    folders = [f for o in outputs for f in find_previous(o)]
    if not folders:
        raise UserError(
            f"no {PREDICTIONS}/{SLICES_INFO} under {', '.join(map(str, outputs))}; fetch the kernels' outputs "
            f"first (make kernel-output SLUG=<each part>)"
        )
    out.mkdir(parents=True, exist_ok=True)
    return run_kernel(model, None, out, previous=folders, sample=sample, scratch=out)
