"""What a fold run leaves behind as text: train.log, log.csv (one row per epoch); curves.png is engine/figures.py's."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ..core.io import write_csv
from ..core.labels import LABELS
from ..core.log import ROOT

LOG_COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "val_weighted_log_loss",
    *[f"val_{c}" for c in LABELS],
    "seconds",
    "train_images_per_s",
]


class _FoldFile(logging.FileHandler):
    """A fold's train.log, on the package's logger: every module's messages while the fold runs. The console is
    core/log.py's one handler; this one only remembers the package logger's level to give it back."""

    previous_level = logging.NOTSET


def open_log(path: Path, enabled: bool, logger: logging.Logger) -> logging.Logger:
    """Open the fold's train.log (rank 0); on other ranks quiet `logger` (the loop's), whose lines rank 0 speaks."""
    close_log(logger)
    if not enabled:
        logger.setLevel(logging.WARNING)
        return logger
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = _FoldFile(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    package = logging.getLogger(ROOT)
    fh.previous_level = package.level
    if package.getEffectiveLevel() > logging.INFO:  # INFO reaches the file even when nothing called log.show()
        package.setLevel(logging.INFO)
    package.addHandler(fh)
    return logger


def close_log(logger: logging.Logger) -> None:
    """Close the fold's train.log and give back the levels `open_log` changed."""
    logger.setLevel(logging.NOTSET)
    package = logging.getLogger(ROOT)
    for h in list(package.handlers):
        if isinstance(h, _FoldFile):
            h.close()
            package.removeHandler(h)
            package.setLevel(h.previous_level)


def write_log_csv(rows: list[dict], path: Path) -> None:
    frame = pd.DataFrame(rows)
    cols = [c for c in LOG_COLUMNS if c in frame.columns] + [c for c in frame.columns if c not in LOG_COLUMNS]
    write_csv(frame[cols] if len(frame) else pd.DataFrame(columns=LOG_COLUMNS), path)
