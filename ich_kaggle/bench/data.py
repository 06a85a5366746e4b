"""Data-layer figures: header scan, DICOM -> cache, cache decode, the synthetic competition."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..core.layout import Layout
from ..data import cache, dicom, meta, synth


def bench_meta(mini: Path | None) -> None:
    """Single-process header scan speed on the real mini set."""
    if mini is None:
        print("header_scan_images_per_s_per_core: skipped (real mini set not found)")
        return
    layout = Layout.of(mini)
    paths = [str(mini / rel) for rel, _ in meta.list_dicoms(layout)]
    for p in paths[:50]:  # warm the page cache: measure parsing, not the disk
        dicom.scan(p)
    best = 0.0
    for _ in range(3):  # CPU time of this process: per-core speed even on a busy shared machine
        t0 = time.process_time()
        for p in paths:
            dicom.scan(p)
        best = max(best, len(paths) / max(time.process_time() - t0, 1e-9))
    print(f"header_scan_images_per_s_per_core: {best:.0f}")


def bench_cache(mini: Path | None) -> None:
    """Single-process DICOM->cache, cache decode speed and bytes per image on the real mini set."""
    if mini is None:
        for name in ("dicom_to_cache_images_per_s_per_core", "cache_decode_images_per_s_per_core", "cache_bytes_per_image"):
            print(f"{name}: skipped (real mini set not found)")
        return
    layout = Layout.of(mini)
    paths = [mini / rel for rel, _ in meta.list_dicoms(layout)]
    plain = _rate(paths, lambda p: p.read_bytes())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for level, name in ((cache.FAST, ""), (cache.SMALL, "small_")):
            good = []
            for p in paths:
                try:
                    cache.cache_one(p, out / f"{p.stem}{cache.SUFFIX}", level)
                    good.append(p)
                except dicom.DicomError:
                    pass
            enc = _rate(good, lambda p: cache.cache_one(p, out / f"{p.stem}{cache.SUFFIX}", level))
            files = [out / f"{p.stem}{cache.SUFFIX}" for p in good]
            dec = _rate(files, lambda f: cache.decode(f.read_bytes()))
            size = np.mean([f.stat().st_size for f in files])
            print(f"{name}dicom_to_cache_images_per_s_per_core: {enc:.0f}")
            print(f"{name}cache_decode_images_per_s_per_core: {dec:.0f}")
            print(f"{name}cache_bytes_per_image: {size:.0f}")
    print(f"plain_file_read_images_per_s_per_core: {plain:.0f}  (reference for this machine's speed)")


def _rate(items: list, fn, repeats: int = 2) -> float:
    """Items per CPU-second of this process (best of `repeats`): per-core speed, robust to a busy shared machine."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.process_time()
        for x in items:
            fn(x)
        best = max(best, len(items) / max(time.process_time() - t0, 1e-9))
    return best


def bench_synth(mini: Path | None = None) -> None:
    """Time rendering and writing the default synthetic competition (the real mini set is not used)."""
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        studies = synth.plan(0)
        rendered = [synth.render_study(s) for s in studies]
        t1, c1 = time.perf_counter(), time.process_time()
        for study, r in zip(studies, rendered):
            synth.write_slices(Path(tmp), study, r.hu, range(len(study.image_ids)))
        t2, c2 = time.perf_counter(), time.process_time()
    n = sum(len(s.image_ids) for s in studies)
    print(f"synth_render_seconds_{n}_slices: {t1 - t0:.2f} (cpu {c1 - c0:.2f})")
    print(f"synth_write_dicom_seconds_{n}_slices: {t2 - t1:.2f} (cpu {c2 - c1:.2f})")
