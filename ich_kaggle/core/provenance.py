"""What a trained fold records about how it was made: the data it saw, the code and the packages.

A fold records these in its done.json (and the data also in last.pt), so that a later stage can refuse a fold
trained on other data (one line naming both folders) and a report can say which code and libraries made a model.
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

import pandas as pd

from .errors import UserError, fix
from .manifest import digest

KEY_PACKAGES = ("torch", "timm", "numpy", "pandas", "pydicom")


def data_identity(data: str | Path, table: pd.DataFrame) -> dict:
    """The data folder a fold trained on: its resolved path (to name it) and a digest of the images of folds.csv
    (to compare it: the same images in a moved folder, or on Kaggle, are the same data)."""
    return {"path": str(Path(data).resolve()), "images": digest(sorted(table["image_id"].astype(str)))}


def check_data(recorded: dict | None, current: dict, where: Path, name: str) -> None:
    """One line when `where` (a fold) was trained on other images than the data folder in use now. Folds recorded
    before this existed carry no identity: they pass (their split digest is still checked)."""
    if not recorded or recorded.get("images") == current["images"]:
        return
    raise UserError(
        f"{where} was trained on the data folder {recorded.get('path')}, not on {current['path']} "
        f"(other images); train beside it with {fix('--run <new name>', 'RUN=<new name>')}, or pass "
        f"the {fix('--data', 'DATA_DIR')} it was trained on ({fix('--force', 'FORCE=1')} replaces it)"
    )


def code_version(root: str | Path | None = None) -> dict | None:
    """The git commit of the package's source and whether the tree had uncommitted changes; None outside git."""
    root = Path(root) if root else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str | None]:
    """Installed versions of the libraries that change what a model computes (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def record(data: str | Path, table: pd.DataFrame) -> dict:
    """Everything a fold records about its making, for done.json."""
    return {"data": data_identity(data, table), "code": code_version(), "packages": package_versions()}


def recorded(done_json: str | Path) -> dict:
    """What a finished fold's done.json says ({} when it is missing or unreadable)."""
    try:
        return json.loads(Path(done_json).read_text())
    except (OSError, ValueError):
        return {}
