"""Training-loader figures: samples per CPU-second of one loader worker, for every shipped config that trains on a GPU.

A worker's work per sample is `SliceDataset[i]`: cache decode (2n+1 slices for 2.5D), black-border crop, window
jitter, geometry, windows, brightness/contrast, blur. Measured in this process with one OpenCV/torch thread (what
each of the `data.num_workers` workers runs with) on the real mini set's cache, built in a temporary work folder,
as CPU time of this process, so a busy shared machine changes the figures little. Progressive-resizing configs are
measured at their final (largest) size. Prints `loader_<config>_samples_per_s_per_worker` (training transforms)
and `loader_<config>_eval_samples_per_s_per_worker` (resize only: validation, OOF, test prediction), and for
DICOM_CONFIGS `loader_<config>_dicom_samples_per_s_per_worker`: the same training samples with `data.source=dicom`
(each slice read and checked from its DICOM instead of decoded from the cache; the files in the page cache, as
after the first epoch of a run whose DICOMs fit the RAM, so a cold mounted disk can only be slower).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np

from ..core import config
from ..core.config import Config
from ..core.layout import Layout

SAMPLES = 200  # per repeat: ~1-3 s of CPU per config and mode
DICOM_CONFIGS = ("seresnext50_512", "seresnext101_480")  # the default and the 2.5D config (3 DICOMs per sample)
REPEATS = 3


def trains_on_gpu(cfg: Config) -> bool:
    """A config meant for a GPU: a pretrained ImageNet backbone trained in mixed precision. The CPU configs fail one
    test each: `tiny` sets train.amp=none (64 px, the tests and the demo), `small_cnn` trains from scratch."""
    return cfg.model.pretrained and cfg.train.amp != "none"


def gpu_configs() -> list[str]:
    return [name for name in config.available() if trains_on_gpu(config.load(name))]


def _rate(ds, rows: list[int]) -> float:
    """Samples per CPU-second over `rows`, best of REPEATS (the page cache is warm after the first)."""
    ds[rows[0]]
    best = 0.0
    for _ in range(REPEATS):
        t0 = time.process_time()
        for i in rows:
            ds[i]
        best = max(best, len(rows) / max(time.process_time() - t0, 1e-9))
    return best


def measure(layout: Layout, name: str, samples: int = SAMPLES, dicom: bool = False) -> dict[str, float]:
    """{"train": samples/s, "eval": samples/s} of one worker for config `name` on `layout`'s cache, or with
    `dicom` {"dicom": training samples/s} read from the DICOMs (data.source=dicom)."""
    import cv2
    import torch

    from ..data import meta
    from ..data.dataset import SliceDataset
    from ..data.transforms import build_eval_transforms, build_train_transforms

    cfg = config.load(name, ["data.source=dicom"] if dicom else None)
    m = meta.load_meta(layout)
    frame = m.loc[m["split"] == "train"].reset_index(drop=True)
    threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        rows = np.random.default_rng(0).permutation(len(frame))[:samples].tolist()  # a shuffled epoch's order
        train = SliceDataset(frame, layout, cfg, transform=build_train_transforms(cfg), train=True, meta=m)
        if dicom:
            return {"dicom": _rate(train, rows)}
        evaluate = SliceDataset(frame, layout, cfg, transform=build_eval_transforms(cfg), train=False, meta=m)
        return {"train": _rate(train, rows), "eval": _rate(evaluate, rows)}
    finally:
        cv2.setNumThreads(threads[0])
        torch.set_num_threads(threads[1])


def bench_loader(mini: Path | None) -> None:
    names = gpu_configs()
    if mini is None:
        for name in names:
            print(f"loader_{name}_samples_per_s_per_worker: skipped (real mini set not found)")
            if name in DICOM_CONFIGS:
                print(f"loader_{name}_dicom_samples_per_s_per_worker: skipped (real mini set not found)")
        return
    from ..data import meta, preprocess

    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout.of(mini, Path(tmp) / "work")
        with contextlib.redirect_stdout(io.StringIO()):  # their summaries are not figures
            meta.load_meta(layout)
            preprocess.preprocess(layout, workers=1)
        for name in names:
            rate = measure(layout, name)
            print(f"loader_{name}_samples_per_s_per_worker: {rate['train']:.0f}")
            print(f"loader_{name}_eval_samples_per_s_per_worker: {rate['eval']:.0f}")
            if name in DICOM_CONFIGS:
                print(f"loader_{name}_dicom_samples_per_s_per_worker: {measure(layout, name, dicom=True)['dicom']:.0f}")
