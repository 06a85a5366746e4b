"""`make bench`: speed and memory figures, printed as `name: value unit` lines. Tests are never timed; this is.

Benchmarks live here, apart from the production code they measure: one module per layer. The figures that need
real RSNA DICOMs read the real mini set (`--mini <folder>`, default: ../shared's tarball extracted into .cache/);
without it (a fresh clone), or with `--mini synthetic`, they read a synthetic competition generated into .cache/
at the real image size; the first line says which data was used. `make bench` runs the quick benchmarks (a few
minutes on 2 cores); the long ones run only when named: `--what stack` (second stage at competition scale, ~15
minutes), `--what choices` (quality of TTA views and weight averaging, 5-8 minutes) and `--what tta-subtypes` (TTA
views and head-crop margins against the rim subtypes, real mini set only, ~15 minutes the first time).
"""

from __future__ import annotations

import importlib
import tarfile
from pathlib import Path

# name -> "module:function"; each takes the data folder (real mini set or synthetic) and prints figures.
BENCHES: dict[str, str] = {
    "synth": "ich_kaggle.bench.data:bench_synth",
    "meta": "ich_kaggle.bench.data:bench_meta",
    "cache": "ich_kaggle.bench.data:bench_cache",
    "loader": "ich_kaggle.bench.loader:bench_loader",
    "train": "ich_kaggle.bench.train:bench",
    "submission": "ich_kaggle.bench.stack:bench_submission",
    "stack": "ich_kaggle.bench.stack:bench_stack",
    "stack-scale": "ich_kaggle.bench.stack_scale:bench_stack_scale",  # every second-stage design, full scale
    "choices": "ich_kaggle.bench.choices:bench_choices",  # quality, not speed: TTA views and weight averaging
    "tta-subtypes": "ich_kaggle.bench.tta_subtypes:bench_tta_subtypes",  # TTA views, crop margin: rim subtypes
}
# long (minutes each; stack-scale tens of CPU-minutes at full scale): only when named with --what
EXPLICIT = {"stack", "choices", "stack-scale", "tta-subtypes"}

SHARED_MINI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "rsna-ich-mini.tar.xz"
SYNTHETIC = "synthetic"  # --mini synthetic: the generated competition even where the real mini set is present
# 240 slices at RSNA's 512 px: enough for per-slice rates, written in ~10-20 s of CPU
BENCH_SYNTH = {"seed": 0, "studies": 20, "slices": 12, "size": 512}


def mini_set(mini: str | Path | None = None) -> Path | None:
    """The extracted real mini set: given, or extracted from ../shared into .cache/; None where there is none."""
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


def bench_data(mini: str | Path | None = None) -> tuple[Path, str]:
    """The data the benchmarks read, and one line saying which it is."""
    real = None if str(mini) == SYNTHETIC else mini_set(mini)
    if real is not None:
        return real, f"data: the real mini set {real}"
    from ..core.errors import fix
    from ..data import synth

    out = synth.write_competition(Path(".cache") / "bench-synth", **BENCH_SYNTH)  # instant once written
    why = "--mini synthetic" if str(mini) == SYNTHETIC else f"{SHARED_MINI} not found"
    return out, (
        f"data: synthetic competition {out} ({why}; {BENCH_SYNTH['studies'] * BENCH_SYNTH['slices']} slices "
        f"at {BENCH_SYNTH['size']} px: DICOM figures are for synthetic files; "
        f"real ones: {fix('--mini <folder>', 'MINI=<folder>')})"
    )


def run(what: list[str], mini: str | Path | None = None, scale: float | None = None) -> None:
    """`scale`: a fraction of the competition's size for the benches that take one (stack-scale)."""
    import inspect

    unknown = [n for n in what if n != "all" and n not in BENCHES]
    if unknown:
        from ..core.errors import UserError

        raise UserError(f"unknown benchmark {', '.join(unknown)}; choose from all, {', '.join(BENCHES)}")
    names = [n for n in BENCHES if n not in EXPLICIT] if "all" in what else what
    data, line = bench_data(mini)
    print(line)
    for name in names:
        module, fn = BENCHES[name].split(":")
        print(f"== {name}")
        bench = getattr(importlib.import_module(module), fn)
        if scale is not None and "scale" in inspect.signature(bench).parameters:
            bench(data, scale=scale)
        else:
            bench(data)
