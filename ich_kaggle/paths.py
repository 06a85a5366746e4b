"""Where each stage reads and writes. Derived files live outside the (often read-only) data folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class Layout:
    """A data folder in the Kaggle layout plus the work folder holding what was derived from it."""

    data: Path
    work: Path

    @classmethod
    def of(cls, data: str | Path, work: str | Path | None = None) -> "Layout":
        data = Path(data)
        return cls(data=data, work=Path(work) if work else Path("work") / data.resolve().name)

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
    def folds_csv(self) -> Path:
        return self.work / "folds.csv"

    @property
    def cache_dir(self) -> Path:
        return self.work / "cache"

    def require_data(self) -> None:
        if not self.data.is_dir():
            raise UserError(
                f"data folder {self.data} not found; download it with `kaggle competitions download -c "
                f"rsna-intracranial-hemorrhage-detection` and unzip, or pass DATA_DIR=<folder> (make demo makes a synthetic one)"
            )
        if not self.train_dir.is_dir() and not self.test_dir.is_dir():
            raise UserError(f"{self.data} has neither stage_2_train/ nor stage_2_test/; point DATA_DIR at the unzipped competition folder")


def run_dir(runs: str | Path, config_name: str) -> Path:
    return Path(runs) / config_name


def fold_dir(runs: str | Path, config_name: str, fold: int) -> Path:
    return run_dir(runs, config_name) / f"fold{fold}"
