"""The one `/kaggle/input` locator: every kernel-side search for an attached source walks the input root here
(in core, because the ImageNet weights search of models/ uses it too).

Kaggle mounts each source at a depth that changed over the years (`/kaggle/input/<slug>/` in old kernels;
`/kaggle/input/competitions/<comp>/<comp>/`, `/kaggle/input/datasets/<owner>/<slug>/[<sub>/]` and
`/kaggle/input/notebooks/<owner>/<slug>/` today), so sources are found by what they hold, at any depth, nearest the
root first. The competition's image folders (hundreds of thousands of DICOMs) are never listed.
(The kernel's install step, `kernel_install.find_code_dir`, runs before ich_kaggle is installed and keeps its own
copy of this walk: the same SKIP_DIRS and depth.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

ENV = "ICH_KAGGLE_INPUT"
KAGGLE_INPUT = Path("/kaggle/input")
SKIP_DIRS = frozenset({"stage_2_train", "stage_2_test", "stage_1_train_images", "stage_1_test_images"})
MAX_DEPTH = 12  # deep enough for /kaggle/input/notebooks/<owner>/<slug>/runs/<config>/fold<N>/ and any sub-folder


def root() -> Path:
    """The input root of this kernel: $ICH_KAGGLE_INPUT (tests, a user's local copy) else /kaggle/input."""
    return Path(os.environ.get(ENV) or KAGGLE_INPUT)


def walk(top: str | Path, max_depth: int = MAX_DEPTH) -> Iterator[tuple[Path, int, list[str]]]:
    """(folder, depth below `top`, file names), sorted, DICOM image folders and hidden folders skipped."""
    top = Path(top)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        depth = len(Path(dirpath).relative_to(top).parts)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and depth < max_depth)
        yield Path(dirpath), depth, filenames


def find_all(top: str | Path, holds: Callable[[Path, list[str]], bool]) -> list[Path]:
    """Every folder under `top` for which `holds(folder, file names)` is true, nearest the root first."""
    return [
        path
        for _, _, path in sorted((depth, str(path), path) for path, depth, files in walk(top) if holds(path, files))
    ]


def find(top: str | Path, holds: Callable[[Path, list[str]], bool], missing: str) -> Path:
    """The nearest folder that `holds`; else a one-line UserError `missing` (what to attach)."""
    top = Path(top)
    if not top.is_dir():
        raise UserError(f"input folder {top} not found; set {ENV} to the folder in the /kaggle/input layout")
    found = find_all(top, holds)
    if not found:
        raise UserError(missing)
    return found[0]


def holding(*names: str) -> Callable[[Path, list[str]], bool]:
    """A test for `find`: the folder holds every one of these files."""
    return lambda path, files: all(n in files for n in names)


def files_matching(top: str | Path, match: Callable[[str], bool]) -> list[Path]:
    """Every file under `top` whose name matches, nearest the root first, then by path."""
    return [
        path / f
        for path in find_all(top, lambda p, files: any(match(f) for f in files))
        for f in sorted(files_in(path))
        if match(f)
    ]


def files_in(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.is_file()]
