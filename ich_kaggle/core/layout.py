"""Where each stage reads and writes. Derived files live outside the (often read-only) data folder."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

COMPETITION = "rsna-intracranial-hemorrhage-detection"


@dataclass(frozen=True)
class Layout:
    """A data folder in the Kaggle layout plus the work folder holding what was derived from it."""

    data: Path
    work: Path

    @classmethod
    def of(cls, data: str | Path, work: str | Path | None = None) -> "Layout":
        """`work` defaults to work/<name>-<hash of the resolved path>: two folders of the same name never share one."""
        data = Path(data)
        return cls(data=data, work=Path(work) if work else Path("work") / work_name(data))

    # --- the competition files (inputs) ---
    @property
    def train_dir(self) -> Path:
        return self.data / "stage_2_train"

    @property
    def test_dir(self) -> Path:
        return self.data / "stage_2_test"

    @property
    def train_csv(self) -> Path:
        return self.data / "stage_2_train.csv"

    @property
    def sample_csv(self) -> Path:
        return self.data / "stage_2_sample_submission.csv"

    @property
    def test_labels_csv(self) -> Path:
        return self.data / "stage_2_test_labels.csv"

    # --- derived files ---
    @property
    def meta_csv(self) -> Path:
        return self.work / "meta.csv"

    @property
    def skipped_csv(self) -> Path:
        return self.work / "skipped.csv"

    @property
    def meta_inputs(self) -> Path:
        """The DICOM listing (path, size, mtime) meta.csv was made from: what an incremental rescan compares."""
        return self.work / "meta_inputs.csv"

    @property
    def folds_csv(self) -> Path:
        return self.work / "folds.csv"

    @property
    def cache_dir(self) -> Path:
        return self.work / "cache"

    @property
    def cache_format(self) -> Path:
        """The cache's format marker: a cache written in another format is removed and rebuilt."""
        return self.cache_dir / "FORMAT"

    @property
    def cache_sources(self) -> Path:
        """image_id, path, size, mtime of the DICOM each cache entry was made from."""
        return self.cache_dir / "sources.csv"

    @property
    def cache_skipped(self) -> Path:
        """DICOMs the cache step could not decode (path, reason, size, mtime): retried once they change."""
        return self.cache_dir / "skipped.csv"

    def require_data(self) -> None:
        if not self.data.is_dir():
            raise UserError(
                f"data folder {self.data} not found; download it with `kaggle competitions download -c "
                f"rsna-intracranial-hemorrhage-detection` and unzip, or pass DATA_DIR=<folder> "
                f"(make demo makes a synthetic one)"
            )
        if not self.train_dir.is_dir() and not self.test_dir.is_dir():
            raise UserError(
                f"{self.data} has neither stage_2_train/ nor stage_2_test/; "
                f"point DATA_DIR at the unzipped competition folder"
            )


def work_name(data: str | Path) -> str:
    """A readable, collision-free work folder name for a data folder: its name plus a short hash of its resolved
    path."""
    resolved = Path(data).resolve()
    return f"{resolved.name or 'root'}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


# --- the run layout: every file an experiment writes under runs/<config>/ is named here and nowhere else ---


@dataclass(frozen=True)
class FoldRun:
    """runs/<config>/fold<k>/: what training one fold writes."""

    dir: Path
    fold: int

    best = property(lambda self: self.dir / "best.pt")  # weights of the best validation epoch
    last = property(lambda self: self.dir / "last.pt")  # everything needed to resume
    config = property(lambda self: self.dir / "config.yaml")  # the resolved config the fold trained with
    log_csv = property(lambda self: self.dir / "log.csv")
    curves = property(lambda self: self.dir / "curves.png")
    train_log = property(lambda self: self.dir / "train.log")
    oof = property(lambda self: self.dir / "oof.csv")  # best.pt on the fold's validation images
    oof_embeddings = property(lambda self: self.dir / "oof_embeddings.npz")
    done = property(lambda self: self.dir / "done.json")  # written last: the fold is finished
    lock = property(lambda self: self.dir / "train.lock")
    lr_find_csv = property(lambda self: self.dir / "lr_find.csv")
    lr_find_png = property(lambda self: self.dir / "lr_find.png")

    @property
    def staging(self) -> "FoldRun":
        """fold<k>.new/: where --force retrains a finished fold, which it replaces only once the new one is done."""
        return FoldRun(self.dir.with_name(self.dir.name + ".new"), self.fold)

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Everything training leaves in the folder (what a training kernel ships and a next version resumes from)."""
        return (
            self.best,
            self.last,
            self.config,
            self.log_csv,
            self.curves,
            self.train_log,
            self.oof,
            self.oof_embeddings,
            self.done,
        )


@dataclass(frozen=True)
class Predictions:
    """runs/<config>/predictions/: TTA predictions per fold, and their fold average (test) / concatenation (OOF)."""

    dir: Path

    test = property(lambda self: self.dir / "test.csv")
    oof = property(lambda self: self.dir / "oof.csv")
    test_embeddings = property(lambda self: self.dir / "test_embeddings.npz")
    oof_embeddings = property(lambda self: self.dir / "oof_embeddings.npz")
    unreadable = property(lambda self: self.dir / "unreadable_test.csv")
    ensemble = property(lambda self: self.dir / "ensemble.json")  # an ensemble's members, combination and OOF scores

    def test_fold(self, k: int) -> Path:
        return self.dir / f"test_fold{k}.csv"

    def oof_fold(self, k: int) -> Path:
        return self.dir / f"oof_fold{k}.csv"

    def test_fold_embeddings(self, k: int) -> Path:
        return self.dir / f"test_fold{k}_embeddings.npz"

    def oof_fold_embeddings(self, k: int) -> Path:
        return self.dir / f"oof_fold{k}_embeddings.npz"

    def fold_projection(self, k: int) -> Path:
        """Fold model k's PCA of its embeddings (predict.compact), fitted on its OOF embeddings."""
        return self.dir / f"oof_fold{k}_pca.npz"


@dataclass(frozen=True)
class Stacked:
    """runs/<config>/stack/: the second stage's predictions and its scores."""

    dir: Path

    oof = property(lambda self: self.dir / "oof.csv")
    test = property(lambda self: self.dir / "test.csv")
    metrics = property(lambda self: self.dir / "metrics.csv")
    curve = property(lambda self: self.dir / "curve.csv")  # per fold: the inner validation loss the stacker stopped on
    models = property(lambda self: self.dir / "models.pt")  # the fitted second stage per fold (`stack.saved`)


@dataclass(frozen=True)
class Run:
    """runs/<config>/: one experiment (a config) and everything its stages write."""

    dir: Path

    @classmethod
    def of(cls, runs: str | Path, config_name: str) -> "Run":
        return cls(Path(runs) / config_name)

    @property
    def name(self) -> str:
        return self.dir.name

    def fold(self, k: int) -> FoldRun:
        return FoldRun(self.dir / f"fold{int(k)}", int(k))

    def finished(self, folds: list[int]) -> list[int]:
        """The folds among `folds` whose training finished (best.pt and done.json)."""
        return [k for k in folds if self.fold(k).best.is_file() and self.fold(k).done.is_file()]

    def prediction_sources(self, sources: list[str]) -> list[Predictions]:
        """First-stage prediction folders to stack (`stack.sources`; empty: this run's own). A source is a
        predictions folder or a run folder holding one."""
        out = []
        for src in sources or [self.predictions.dir]:
            inside = Run(Path(src)).predictions
            out.append(
                inside if inside.dir.is_dir() and not Predictions(Path(src)).oof.exists() else Predictions(Path(src))
            )
        return out

    def folds(self) -> dict[int, FoldRun]:
        """The fold folders that exist, by fold number."""
        out = {}
        for d in sorted(self.dir.glob("fold*")):
            if d.is_dir() and d.name[4:].isdigit():
                out[int(d.name[4:])] = FoldRun(d, int(d.name[4:]))
        return dict(sorted(out.items()))

    config = property(lambda self: self.dir / "config.yaml")  # the resolved config (written by the kernel)
    predictions = property(lambda self: Predictions(self.dir / "predictions"))
    stack = property(lambda self: Stacked(self.dir / "stack"))
    # the embedding-level second stage fitted beside the probability one (stack.embedding_stage)
    embedding_stack = property(lambda self: Stacked(self.dir / "stack_embeddings"))
    blend = property(lambda self: Stacked(self.dir / "blend"))  # submit's blend of the stages, when it measured better
    report = property(lambda self: self.dir / "report")
    job_logs = property(lambda self: self.dir / "jobs")  # one log per fold trained side by side (`make recipe`)
    choice = property(lambda self: self.dir / "choice.json")  # which stage submit chose, with both OOF scores
