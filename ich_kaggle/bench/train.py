"""`make bench` figures for training. Each measurement runs in a fresh subprocess so its peak RSS is its own.

Prints `tiny_train_images_per_s_cpu`, `tiny_peak_rss_mb` (tiny config, one short epoch on the synthetic
competition, or the real mini set when given) and `seresnext50_512_fwd_bwd_images_per_s_cpu`,
`seresnext50_512_peak_rss_mb` (one batch of 2 at 512 px, pretrained=false). With CUDA it adds the same on the GPU
with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _child_tiny(data: str | None, device: str) -> dict:
    import pandas as pd

    from ..core import config
    from ..core.layout import Layout, Run
    from ..engine.loop import train_fold

    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            from ..data import synth

            data = str(synth.write_competition(Path(tmp) / "synth", seed=0, studies=16, slices=12, size=96))
        layout = Layout.of(data, Path(tmp) / "work")
        from ..data import folds, preprocess

        cfg = config.load(
            "tiny", ["train.epochs=1", "train.max_images_per_epoch=128", "cv.k=2", "model.pretrained=false"]
        )
        folds.load_folds(layout, k=cfg.cv.k, seed=cfg.cv.seed)  # the config's folds; preparing them is not measured
        preprocess.ensure(layout)
        if device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        train_fold(cfg, layout, 0, runs=Path(tmp) / "runs")
        row = pd.read_csv(Run.of(Path(tmp) / "runs", cfg.name).fold(0).log_csv).iloc[-1]
        return {"images_per_s": float(row["train_images_per_s"]), "peak_rss_mb": _peak_rss_mb()}


def _child_seresnext(device: str) -> dict:
    from ..core import config
    from .models import bench_forward_backward

    cfg = config.load("seresnext50_512", ["model.pretrained=false"])
    result = bench_forward_backward(
        cfg.model.backbone, size=512, batch=2, in_channels=cfg.data.in_channels, steps=2, warmup=1, device=device
    )
    out = {"images_per_s": float(result["images_per_s"]), "peak_rss_mb": _peak_rss_mb()}
    if device == "cuda":
        out["cuda_max_memory_allocated_mb"] = float(result["cuda_peak_mb"])
    return out


def _run_child(*args: str) -> dict:
    env = dict(os.environ)
    if args[-1] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", "ich_kaggle.bench.train", *args], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def bench(mini: str | Path | None = None) -> None:
    """Print training speed/memory lines (`name: value`). `mini` is ignored for speed: synthetic data is used."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        t0 = time.perf_counter()
        tiny = _run_child("tiny", "-", dev)
        if "error" in tiny:
            print(f"tiny_train_{dev}: failed ({tiny['error']})")
        else:
            print(f"tiny_train_images_per_s_{dev}: {tiny['images_per_s']:.1f}")
            print(f"tiny_peak_rss_mb{'' if dev == 'cpu' else '_' + dev}: {tiny['peak_rss_mb']:.0f}")
        big = _run_child("seresnext50", dev)
        if "error" in big:
            print(f"seresnext50_512_fwd_bwd_{dev}: failed ({big['error']})")
        else:
            print(f"seresnext50_512_fwd_bwd_images_per_s_{dev}: {big['images_per_s']:.2f}")
            print(f"seresnext50_512_peak_rss_mb{'' if dev == 'cpu' else '_' + dev}: {big['peak_rss_mb']:.0f}")
            if "cuda_max_memory_allocated_mb" in big:
                print(f"seresnext50_512_cuda_max_memory_allocated_mb: {big['cuda_max_memory_allocated_mb']:.0f}")
        print(f"train_bench_seconds_{dev}: {time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "tiny":
        data_arg, device_arg = rest
        res = _child_tiny(None if data_arg == "-" else data_arg, device_arg)
    else:
        res = _child_seresnext(rest[0])
    print(json.dumps(res))
