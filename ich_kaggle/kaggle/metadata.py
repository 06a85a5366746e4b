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


def write_kernel(folder: Path, kernel_id: str, script: str, gpu: bool, datasets: list[str],
                 kernel_sources: list[str] = (), competition: bool = True) -> Path:
    """kernels/<slug>/: the script and its metadata (sources as given, in order, duplicates dropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_open(folder / KERNEL_FILE) as f:
        f.write(script)
    slug = kernel_id.split("/", 1)[1]
    meta = {"id": kernel_id, "title": title_for(slug), "code_file": KERNEL_FILE, "language": "python",
            "kernel_type": "script", "is_private": True, "enable_gpu": gpu, "enable_tpu": False,
            "enable_internet": False, "dataset_sources": list(dict.fromkeys(datasets)),
            "competition_sources": [COMPETITION] if competition else [],
            "kernel_sources": list(dict.fromkeys(kernel_sources)), "model_sources": [],
            "docker_image_pinning_type": IMAGE_PINNING}
    if gpu:
        meta["machine_shape"] = MACHINE_SHAPE
    with atomic_open(folder / KERNEL_META) as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return folder


def read(folder: Path) -> dict:
    return json.loads((folder / KERNEL_META).read_text())
