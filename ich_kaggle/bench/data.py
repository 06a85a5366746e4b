"""Data-layer figures: header scan, DICOM -> cache, cache decode, the synthetic competition."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.layout import Layout
from ..data import cache, codec, dicom, inputs, preprocess, synth
from . import handcodec


N_COMPETITION = 874_035  # slices of the stage-2 competition (train + test)
N_TEST = 121_232  # stage-2 test slices: what a Kaggle inference kernel caches (on its scratch disk, ~53 GB)


def bench_meta(mini: Path | None) -> None:
    """Single-process header scan speed on the real mini set."""
    if mini is None:
        print("header_scan_images_per_s_per_core: skipped (real mini set not found)")
        return
    listing, _ = inputs.list_inputs(Layout.of(mini))
    paths = [str(mini / rel) for rel in listing["path"]]
    for p in paths[:50]:  # warm the page cache: measure parsing, not the disk
        dicom.scan(p)
    best = 0.0
    for _ in range(3):  # CPU time of this process: per-core speed even on a busy shared machine
        t0 = time.process_time()
        for p in paths:
            dicom.scan(p)
        best = max(best, len(paths) / max(time.process_time() - t0, 1e-9))
    print(f"header_scan_images_per_s_per_core: {best:.0f}")


def _codecs() -> dict[str, tuple[Callable[[np.ndarray], bytes], Callable[[bytes], np.ndarray]]]:
    """The candidates of issue 11: name -> (encode int16 HU, decode to an array); those whose library is missing are
    left out."""
    out = {
        "handwritten_fast": (lambda h: handcodec.encode(h, handcodec.FAST), handcodec.decode),
        "handwritten_small": (lambda h: handcodec.encode(h, handcodec.SMALL), handcodec.decode),
        "blosc2_lz4_9_shuffle (the cache)": (codec.encode, codec.decode),
    }
    try:
        import blosc2

        def b2(name: str, clevel: int, *filters: str):
            cp = blosc2.CParams(
                codec=getattr(blosc2.Codec, name),
                clevel=clevel,
                typesize=2,
                nthreads=1,
                filters=[getattr(blosc2.Filter, f) for f in filters],
                filters_meta=[0] * len(filters),
            )
            return (
                lambda h: blosc2.compress2(h, cparams=cp),
                lambda b: np.frombuffer(blosc2.decompress2(b, dparams=blosc2.DParams(nthreads=1)), np.int16),
            )

        out["blosc2_zstd1_shuffle_bytedelta (the former cache, IHU3)"] = b2("ZSTD", 1, "SHUFFLE", "BYTEDELTA")
        out["blosc2_zstd1_bitshuffle"] = b2("ZSTD", 1, "BITSHUFFLE")
        out["blosc2_lz4_5_bitshuffle"] = b2("LZ4", 5, "BITSHUFFLE")
        out["blosc2_lz4_9_shuffle_bytedelta"] = b2("LZ4", 9, "SHUFFLE", "BYTEDELTA")
        out["blosc2_lz4hc_9_shuffle_bytedelta"] = b2("LZ4HC", 9, "SHUFFLE", "BYTEDELTA")
        out["blosc2_blosclz_5_shuffle"] = b2("BLOSCLZ", 5, "SHUFFLE")
    except ImportError:
        pass
    try:
        import imagecodecs  # HU + 32768 as uint16: both codecs take unsigned samples

        def unsigned(h: np.ndarray) -> np.ndarray:
            return (h.astype(np.int32) + 32768).astype(np.uint16)

        def signed(u: np.ndarray) -> np.ndarray:
            return (u.astype(np.int32) - 32768).astype(np.int16)

        if imagecodecs.JPEGLS.available:
            out["imagecodecs_jpegls"] = (
                lambda h: imagecodecs.jpegls_encode(unsigned(h)),
                lambda b: signed(imagecodecs.jpegls_decode(b)),
            )
        if imagecodecs.JPEGXL.available:
            out["imagecodecs_jpegxl_lossless_effort1"] = (
                lambda h: imagecodecs.jpegxl_encode(unsigned(h), lossless=True, effort=1, numthreads=1),
                lambda b: signed(imagecodecs.jpegxl_decode(b, numthreads=1)),
            )
    except ImportError:
        pass
    return out


def bench_cache(mini: Path | None) -> None:
    """The codec table (encode/s, decode/s per core, kB/slice, each checked lossless) and the cache's own figures:
    DICOM -> cache file and cache file -> HU, single process, on the real mini set."""
    names = ("dicom_to_cache_images_per_s_per_core", "cache_decode_images_per_s_per_core", "cache_bytes_per_image")
    if mini is None:
        for name in names:
            print(f"{name}: skipped (real mini set not found)")
        return
    layout = Layout.of(mini)
    listing, _ = inputs.list_inputs(layout)
    paths, hus = [], []
    for rel in listing["path"]:
        try:
            hus.append(dicom.read_hu(mini / rel, dtype=np.int16))
            paths.append(mini / rel)
        except dicom.DicomError:
            pass
    print(f"codec table: {len(hus)} slices of {mini}, CPU seconds of this process (per core)")
    for name, (enc, dec) in _codecs().items():
        blobs = [enc(h) for h in hus]
        lossless = all(np.array_equal(np.asarray(dec(b)).reshape(h.shape), h) for b, h in zip(blobs, hus))
        kb = np.mean([len(b) for b in blobs]) / 1024
        print(
            f"codec_{name}: encode {_rate(hus, enc):.0f}/s, decode {_rate(blobs, dec):.0f}/s, {kb:.0f} kB/slice, "
            f"full cache ~{kb * N_COMPETITION / 1e6:.0f} GB, test cache ~{kb * N_TEST / 1e6:.1f} GB, "
            f"lossless {'yes' if lossless else 'NO'}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = [out / f"{p.stem}{cache.SUFFIX}" for p in paths]
        enc = _rate(list(zip(paths, files)), lambda pf: preprocess.cache_one(*pf))
        no_write = _rate(paths, lambda p: codec.encode(dicom.read_hu(p, dtype=np.int16)))
        blobs = [f.read_bytes() for f in files]
        write = _rate(list(zip(files, blobs)), lambda fb: cache.write_entry(*fb))
        dec = _rate(files, lambda f: codec.decode(f.read_bytes()))
        print(f"dicom_to_cache_images_per_s_per_core: {enc:.0f}  (read + HU + encode + atomic write; target >= 300)")
        print(f"dicom_to_cache_without_write_images_per_s_per_core: {no_write:.0f}  (read + HU + encode)")
        print(
            f"cache_file_write_images_per_s_per_core: {write:.0f}  (the atomic write alone: this machine's file system)"
        )
        print(f"cache_decode_images_per_s_per_core: {dec:.0f}  (file read + decode; target >= 65, x3 for 2.5D)")
        print(f"cache_bytes_per_image: {np.mean([f.stat().st_size for f in files]):.0f}")
    print(
        f"plain_file_read_images_per_s_per_core: {_rate(paths, lambda p: p.read_bytes()):.0f}  "
        f"(reference for this machine's speed)"
    )


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
