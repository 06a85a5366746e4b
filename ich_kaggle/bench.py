"""`make bench`: speed and memory figures, printed as `name: value unit` lines. Tests are never timed; this is.

Each stage owns its benchmark as a `bench(mini)` function next to the code it measures.
"""

from __future__ import annotations

import importlib
import tarfile
from pathlib import Path

# name -> "module:function"; each takes the extracted real mini set (or None) and prints figures.
BENCHES: dict[str, str] = {
    "synth": "ich_kaggle.data.synth:bench",
    "meta": "ich_kaggle.data.meta:bench",
    "cache": "ich_kaggle.data.cache:bench",
    "train": "ich_kaggle.train:bench",
    "stack": "ich_kaggle.stack:bench",
}

SHARED_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsna-ich-mini.tar.xz"


def mini_set(mini: str | Path | None = None) -> Path | None:
    """The extracted real mini set: given, or extracted from ../shared into .cache/."""
    if mini:
        return Path(mini)
    if not SHARED_MINI.exists():
        return None
    out = Path(".cache") / "rsna-ich-mini"
    if not (out / ".extracted").exists():
        out.parent.mkdir(exist_ok=True)
        with tarfile.open(SHARED_MINI) as t:
            t.extractall(out.parent, filter="data")
        (out / ".extracted").touch()
    return out


def run(what: list[str], mini: str | Path | None = None) -> None:
    names = list(BENCHES) if "all" in what else what
    data = mini_set(mini)
    if data is None:
        print(f"note: {SHARED_MINI} not found; benchmarks that need the real mini set use synthetic data")
    for name in names:
        module, fn = BENCHES[name].split(":")
        print(f"== {name}")
        getattr(importlib.import_module(module), fn)(data)
