"""Mixed precision by what the GPU can do, not by what `torch.cuda.is_bf16_supported()` says.

That call counts emulation and answers True on a T4 (compute capability 7.5), where cuDNN has no bf16 convolutions:
the run fails or crawls. So the compute capability decides: bf16 from 8.0 (Ampere on), fp16 with a GradScaler from
7.0 (V100, T4), and a one-line stop for a GPU this torch has no kernels for (a P100, 6.0, on Kaggle's CUDA 12.8 torch:
`is_available()` is True and the first CUDA operation dies). Training and inference both go through `choose`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..core.errors import UserError

BF16_FROM = (8, 0)  # cuDNN's bf16 convolutions
FP16_FROM = (7, 0)  # tensor cores


@dataclass(frozen=True)
class Precision:
    amp: str  # bf16 | fp16 | none (the autocast actually used)
    device_type: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    @property
    def scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has float32's range."""
        return self.amp == "fp16" and self.device_type == "cuda"

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        return f"precision {self.amp} ({self.reason})"


def _torch_runs(cap: tuple[int, int]) -> bool:
    """Whether this torch build has kernels for compute capability `cap`: a cubin of the same major version and a
    minor at most `cap`'s, or PTX of a capability at most `cap` (the driver compiles it)."""
    arches = torch.cuda.get_arch_list()
    if not arches:
        return True  # unknown (no list): let CUDA say so
    for arch in arches:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        major, minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and major == cap[0] and minor <= cap[1]:
            return True
        if kind == "compute" and (major, minor) <= cap:
            return True
    return False


def choose(requested: str, device: torch.device) -> Precision:
    """The autocast for `train.amp` = `requested` on `device`; raises a one-line UserError for an unusable GPU."""
    if device.type != "cuda":
        if requested == "none":
            return Precision("none", device.type, "train.amp=none")
        return Precision("bf16", device.type, f"{device.type}: autocast supports bf16 only")
    cap = tuple(torch.cuda.get_device_capability(device))
    name = torch.cuda.get_device_name(device)
    where = f"{name}, compute capability {cap[0]}.{cap[1]}"
    if not _torch_runs(cap):
        raise UserError(
            f"{where}: torch {torch.__version__} has no CUDA kernels for it (built for "
            f"{' '.join(torch.cuda.get_arch_list())}); use a GPU of compute capability 7.0 or newer "
            f"(on Kaggle: GPU T4 x2, machine_shape NvidiaTeslaT4 in kernel-metadata.json)"
        )
    if requested == "none":
        return Precision("none", "cuda", f"{where}; train.amp=none")
    if cap < FP16_FROM:
        return Precision("none", "cuda", f"{where}: no tensor cores, float32")
    if requested == "bf16" and cap < BF16_FROM:
        return Precision("fp16", "cuda", f"{where}: cuDNN has no bf16 convolutions below 8.0, fp16 with loss scaling")
    return Precision(requested, "cuda", where)
