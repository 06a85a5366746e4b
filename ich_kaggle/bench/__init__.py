"""`make bench`: speed and memory figures, printed as `name: value unit` lines. Tests are never timed; this is.

Benchmarks live here, apart from the production code they measure: one module per layer.
"""

from __future__ import annotations

import importlib
import tarfile
from pathlib import Path

# name -> "module:function"; each takes the extracted real mini set (or None) and prints figures.
BENCHES: dict[str, str] = {
    "synth": "ich_kaggle.bench.data:bench_synth",
    "meta": "ich_kaggle.bench.data:bench_meta",
    "cache": "ich_kaggle.bench.data:bench_cache",
    "loader": "ich_kaggle.bench.loader:bench_loader",
    "train": "ich_kaggle.bench.train:bench",
    "stack": "ich_kaggle.bench.stack:bench_stack",
    "stack-scale": "ich_kaggle.bench.stack_scale:bench_stack_scale",  # every second-stage design, full scale
    "choices": "ich_kaggle.bench.choices:bench_choices",  # quality, not speed: TTA views and weight averaging
}

EXPLICIT = {"stack-scale"}  # long (tens of CPU-minutes at full scale): only when named

SHARED_MINI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "rsna-ich-mini.tar.xz"


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


def run(what: list[str], mini: str | Path | None = None, scale: float | None = None) -> None:
    """`scale`: a fraction of the competition's size for the benches that take one (stack-scale)."""
    import inspect

    names = [n for n in BENCHES if n not in EXPLICIT] if "all" in what else what
    data = mini_set(mini)
    if data is None:
        print(f"note: {SHARED_MINI} not found; benchmarks that need the real mini set use synthetic data")
    for name in names:
        module, fn = BENCHES[name].split(":")
        print(f"== {name}")
        bench = getattr(importlib.import_module(module), fn)
        if scale is not None and "scale" in inspect.signature(bench).parameters:
            bench(data, scale=scale)
        else:
            bench(data)
