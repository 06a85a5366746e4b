"""`make bench --what stack-scale`: every second-stage design at competition scale, on simulated first-stage outputs.

753k train slices in ~21k series and 122k test slices (series structure from the real stage-1 test headers when
../shared has them, else generated), 5 folds, `members` first-stage models, each with five fold models whose
embeddings are simulated in the compact form predict writes (`predict.compact`: `stack.embedding_dim` whitened
components, float16, a different rotation per fold model: five fold models have five feature spaces). Each design
runs in its own process (so its peak RAM is its own) on `stack.threads` threads and prints wall, CPU, peak RAM, the
disk its inputs take and its OOF loss:

- probs: the probability-level stacker over the members' OOF predictions (always fitted);
- per_fold: the embedding-level stacker, one per fold model, in that model's own space (stack.embedding_space);
- mixture: one embedding-level stacker over OOF embeddings of mixed spaces, test embeddings averaged.

The default design (what `stack.embedding_stage` runs: probs, then per_fold) prints `stack_scale_cpu_s` and
`stack_scale_peak_rss_gb`. Targets (issue 26): peak RAM < 8 GB, CPU < 20 minutes.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.config import StackConfig
from ..core.io import write_csv
from ..core.labels import LABELS
from .stack import COMPETITION_TEST_SLICES, COMPETITION_TRAIN_SLICES, HEADERS

DESIGNS = ("probs", "per_fold", "mixture")
DEFAULT_DESIGN = ("probs", "per_fold")
FULL_EMBEDDING_BYTES = 2048 * 2 + 48  # a 2048-d float16 row + its image id as numpy writes it (before issue 26)


def _simulated(scale: float, members: int, dim: int, seed: int = 0):
    """The simulated competition: meta, folds, and per member m and fold model k its OOF / test predictions and
    compact embeddings (image_id, emb float16)."""
    from ..stack.simulate import real_series_z, simulate, synthetic_series_z

    structure = real_series_z(HEADERS) if HEADERS.exists() else synthetic_series_z(2000, np.random.default_rng(0))
    mean_len = float(np.mean([len(s) for s in structure]))
    n_train = max(20, int(round(COMPETITION_TRAIN_SLICES * scale / mean_len)))
    n_test = max(4, int(round(COMPETITION_TEST_SLICES * scale / mean_len)))
    sim = simulate(n_train, n_test, k=5, seed=seed, structure=structure)
    rng = np.random.default_rng(seed + 1)
    labels = list(LABELS)
    train_y = sim.folds[labels].to_numpy(np.float32)
    test_y = sim.test_truth[labels].to_numpy(np.float32)
    base_oof = np.log(sim.oof[labels].to_numpy() / (1 - sim.oof[labels].to_numpy()))
    base_test = np.log(sim.test[labels].to_numpy() / (1 - sim.test[labels].to_numpy()))
    # what the CNN saw beyond its own logits: a per-slice latent correlated with the labels (what embeddings add)
    latent_train = 1.5 * train_y + rng.normal(0, 1.0, train_y.shape)
    latent_test = 1.5 * test_y + rng.normal(0, 1.0, test_y.shape)
    folds = sim.folds["fold"].to_numpy()
    out = {}
    for m in range(members):
        for k in range(5):
            side = max(dim, len(labels))  # fold model k's own feature space: a random rotation of the latent
            rot = np.linalg.qr(rng.normal(size=(side, side)))[0][: len(labels), :dim]
            held = folds == k
            oof_p = 1 / (1 + np.exp(-(base_oof[held] + rng.normal(0, 0.7, (held.sum(), len(labels))))))
            test_p = 1 / (1 + np.exp(-(base_test + rng.normal(0, 0.7, base_test.shape))))
            oof_e = (latent_train[held] @ rot + rng.normal(0, 0.5, (held.sum(), dim))).astype(np.float16)
            test_e = (latent_test @ rot + rng.normal(0, 0.5, (len(base_test), dim))).astype(np.float16)
            ids = sim.oof["image_id"].to_numpy()[held]
            out[m, k] = (
                _frame(ids, oof_p),
                _frame(sim.test["image_id"].to_numpy(), test_p),
                (ids.astype(str), oof_e),
                (sim.test["image_id"].to_numpy().astype(str), test_e),
            )
    return sim, out


def _frame(ids: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(probs, columns=list(LABELS))
    frame.insert(0, "image_id", ids)
    return frame


def _disk(design: str, parts: dict, members: int, tmp: Path) -> int:
    """Bytes of the files the design reads, written as predict writes them (CSV predictions, npz embeddings)."""
    from ..predict.stage import save_embeddings

    total = 0
    for m in range(members):
        for k in range(5):
            oof, test, oof_e, test_e = parts[m, k]
            files = [(oof, tmp / f"m{m}_oof_fold{k}.csv")]
            if k == 0:
                files.append((test, tmp / f"m{m}_test.csv"))
            for frame, path in files:
                write_csv(frame, path)
                total += path.stat().st_size
            if design == "per_fold":
                for (ids, emb), name in ((oof_e, "oof"), (test_e, "test")):
                    path = tmp / f"m{m}_{name}_fold{k}_embeddings.npz"
                    save_embeddings(path, ids, emb)
                    total += path.stat().st_size
    if design == "mixture":  # full embeddings: the OOF rows once, the fold-averaged test rows once, per member
        n_rows = sum(len(parts[0, k][2][0]) for k in range(5)) + len(parts[0, 0][3][0])
        total += members * n_rows * FULL_EMBEDDING_BYTES
    return total


def _run_design(design: str, scale: float, members: int, scfg: StackConfig, queue) -> None:
    """One design in this (child) process; a failure comes back as its one-line message."""
    try:
        queue.put(_design(design, scale, members, scfg))
    except Exception as e:  # noqa: BLE001 - reported by the parent, which names the design
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _design(design: str, scale: float, members: int, scfg: StackConfig) -> dict:
    """Simulate, then fit the design, timing only the fit."""
    from ..stack.pipeline import FoldInputs, run_per_fold, run_stacking
    from ..stack.stage import reduce_embeddings

    sim, parts = _simulated(scale, members, scfg.embedding_dim)
    with tempfile.TemporaryDirectory() as tmp:
        disk = _disk(design, parts, members, Path(tmp))
    oof = [pd.concat([parts[m, k][0] for k in range(5)], ignore_index=True) for m in range(members)]
    test = [
        pd.concat([parts[m, k][1].set_index("image_id")[list(LABELS)] for k in range(5)])
        .groupby(level=0)
        .mean()
        .reset_index()
        for m in range(members)
    ]
    names = [f"member{m}" for m in range(members)]
    start, cpu = time.perf_counter(), time.process_time()
    if design == "probs":
        result = run_stacking(sim.meta, sim.folds, oof, test, scfg, source_names=names, progress=False)
    elif design == "per_fold":
        inputs = {}
        for k in range(5):
            ox, tx = [], []
            for m in range(members):
                o, t = reduce_embeddings(
                    parts[m, k][2], parts[m, k][3], scfg.embedding_dim, prefix=f"m{m}", seed=scfg.seed
                )
                ox.append(o.set_index("image_id"))
                tx.append(t.set_index("image_id"))
            inputs[k] = FoldInputs(
                [parts[m, k][0] for m in range(members)],
                [parts[m, k][1] for m in range(members)],
                pd.concat(ox, axis=1).reset_index(),
                pd.concat(tx, axis=1).reset_index(),
            )
        result = run_per_fold(sim.meta, sim.folds, inputs, scfg.embedding_level(), source_names=names, progress=False)
    else:
        ox, tx = [], []
        for m in range(members):
            oof_e = (
                np.concatenate([parts[m, k][2][0] for k in range(5)]),
                np.concatenate([parts[m, k][2][1] for k in range(5)]),
            )
            test_e = (parts[m, 0][3][0], np.mean([parts[m, k][3][1].astype(np.float32) for k in range(5)], axis=0))
            o, t = reduce_embeddings(oof_e, test_e, scfg.embedding_dim, prefix=f"m{m}", seed=scfg.seed)
            ox.append(o.set_index("image_id"))
            tx.append(t.set_index("image_id"))
        mixture = replace(scfg.embedding_level(), embedding_space="mixture")
        result = run_stacking(
            sim.meta,
            sim.folds,
            oof,
            test,
            mixture,
            pd.concat(ox, axis=1).reset_index(),
            pd.concat(tx, axis=1).reset_index(),
            source_names=names,
            progress=False,
        )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    losses = result.metrics.set_index("stage")["weighted_log_loss"]
    stops = result.curve["stop"][result.curve["stop"].astype(str) != ""].value_counts().to_dict()
    return {
        "design": design,
        "wall_s": wall,
        "cpu_s": cpu,
        "disk_gb": disk / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # KiB on Linux
        "first_stage": float(losses["first_stage"]),
        "stacked": float(losses["stacked"]),
        "steps": result.curve.groupby("fold")["step"].max().tolist() if len(result.curve) else [],
        "stops": stops,
        "train_slices": len(sim.oof),
        "series": int(sim.meta["series_id"].nunique()),
        "test_slices": len(sim.test),
    }


def bench_stack_scale(
    mini: Path | None = None,
    scale: float = 1.0,
    members: int = 2,
    designs: tuple[str, ...] = DESIGNS,
    scfg: StackConfig | None = None,
) -> dict[str, dict]:
    """Each design in a fresh process, one after the other; prints `stack_scale[<design>]_<figure>: value` lines."""
    scfg = scfg or StackConfig()
    ctx = mp.get_context("fork")  # the child inherits the imports, not a copy of any data (none is loaded yet)
    results = {}
    if scale < 1:
        print(
            f"stack_scale_note: scaled down to {scale:g} of the competition's slices (`--scale`); CPU and disk "
            f"grow about linearly with it"
        )
    for design in designs:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_design, args=(design, scale, members, scfg, queue))
        proc.start()
        r = None
        while r is None:
            try:
                r = queue.get(timeout=5)
            except Exception:  # queue.Empty: still working, unless it died
                if not proc.is_alive():
                    r = {"error": f"the process exited with code {proc.exitcode}"}
        proc.join()
        if "error" in r:
            raise RuntimeError(f"stack-scale design {design}: {r['error']}")
        results[design] = r
        tag = f"stack_scale[{design}]"
        print(f"{tag}_wall_s: {r['wall_s']:.1f}")
        print(f"{tag}_cpu_s: {r['cpu_s']:.1f}")
        print(f"{tag}_peak_rss_gb: {r['peak_rss_gb']:.2f}")
        print(f"{tag}_disk_gb: {r['disk_gb']:.3f}")
        print(f"{tag}_oof_log_loss: {r['stacked']:.5f} (first stage {r['first_stage']:.5f})")
        print(f"{tag}_steps_per_net: {r['steps']}  stopped by: {r['stops']}")
    r0 = next(iter(results.values()))
    print(
        f"stack_scale_data: {r0['train_slices']} train slices in {r0['series']} series, {r0['test_slices']} test "
        f"slices, 5 folds, {members} members, {scfg.threads} thread(s), model {scfg.model} hidden {scfg.hidden}"
    )
    chosen = [d for d in DEFAULT_DESIGN if d in results]
    if chosen:
        print(f"stack_scale_design: {' + '.join(chosen)} (the default: stack.embedding_stage)")
        print(f"stack_scale_cpu_s: {sum(results[d]['cpu_s'] for d in chosen):.1f}")
        print(f"stack_scale_wall_s: {sum(results[d]['wall_s'] for d in chosen):.1f}")
        print(f"stack_scale_peak_rss_gb: {max(results[d]['peak_rss_gb'] for d in chosen):.2f}")
        print(f"stack_scale_disk_gb: {max(results[d]['disk_gb'] for d in chosen):.3f}")
    return results
