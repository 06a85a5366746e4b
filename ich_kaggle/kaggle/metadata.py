"""The one writer of `kernel-metadata.json` (inference, prepare, training and GPU-check kernels alike).

Every kernel is private, offline, and, when it needs a GPU, on T4 x2 (`machine_shape`: without it a CLI push lands on
another accelerator) with Kaggle's image pinned to the version the kernel was first run on
(`docker_image_pinning_type`), so a later version runs on the same torch and numpy as the first.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.io import atomic_open
from ..core.layout import COMPETITION

KERNEL_META = "kernel-metadata.json"
KERNEL_FILE = "kernel.py"
MACHINE_SHAPE = "NvidiaTeslaT4"  # the API's name for "GPU T4 x2" (kaggle-cli PR 1198)
IMAGE_PINNING = "original"  # kaggle-cli: "original" keeps the image of the kernel's first version, "latest" moves


def title_for(slug: str) -> str:
    """A title Kaggle resolves back to the same slug (else it warns and may rename the kernel)."""
    from .run import slugify

    title = slug.replace("-", " ")
    title = "ICH" + title[3:] if title.startswith("ich") else title
    assert slugify(title) == slug
    return title


def write_kernel(
    folder: Path,
    kernel_id: str,
    script: str,
    gpu: bool,
    datasets: list[str],
    kernel_sources: list[str] = (),
    competition: bool = True,
) -> Path:
    """kernels/<slug>/: the script and its metadata (sources as given, in order, duplicates dropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(folder / KERNEL_FILE) as f:
        f.write(script)
    slug = kernel_id.split("/", 1)[1]
    meta = {
        "id": kernel_id,
        "title": title_for(slug),
        "code_file": KERNEL_FILE,
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": gpu,
        "enable_tpu": False,
        "enable_internet": False,
        "dataset_sources": list(dict.fromkeys(datasets)),
        "competition_sources": [COMPETITION] if competition else [],
        "kernel_sources": list(dict.fromkeys(kernel_sources)),
        "model_sources": [],
        "docker_image_pinning_type": IMAGE_PINNING,
    }
    if gpu:
        meta["machine_shape"] = MACHINE_SHAPE
    with atomic_open(folder / KERNEL_META) as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return folder


# --- dataset folders (code, weights, model): dataset-metadata.json and the folder swapped in whole ---------------
DATASET_META = "dataset-metadata.json"
LICENSE = "CC0-1.0"


def write_json(path: Path, data: dict) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def dataset_metadata(title: str, dataset_id: str, description: str) -> dict:
    return {"title": title, "id": dataset_id, "licenses": [{"name": LICENSE}], "description": description}


def fresh_tmp(final: Path) -> Path:
    """An empty sibling folder to build a dataset in before `swap_in`."""
    import shutil

    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, final: Path) -> None:
    """Replace a dataset folder in one step so a failed build never leaves a half-updated one (stale wheels)."""
    import shutil

    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def read(folder: Path) -> dict:
    return json.loads((folder / KERNEL_META).read_text())
