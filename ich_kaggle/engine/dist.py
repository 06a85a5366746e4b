"""Process-level set-up: DDP from torchrun's environment, device choice, and seeds.

Batch convention under DDP: `train.batch_size` is the *global* batch of one forward/backward step; each of the
N ranks gets batch_size / N images (it must divide). So a run on 2 GPUs and one on 1 GPU take the same optimizer
steps on the same images (the DDP test checks this), and the learning rate needs no rescaling.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import UserError, fix


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False
    local_world_size: int = 1  # processes of this run on this machine (they share its CPUs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup() -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun) and join the process group (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=pick_device(0))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # long timeout: rank 0 may spend a while writing OOF files while the others wait at a barrier
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=60))
        created = True
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local,
        device=device,
        initialized_here=created,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
    )


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without DDP)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    if batch_size % info.world_size:
        n = info.world_size
        raise UserError(
            f"train.batch_size={batch_size} is the global batch and must divide by the "
            f"{info.world_size} processes; pass "
            f"{fix(f'--set train.batch_size=<multiple of {n}>', f'BATCH=<multiple of {n}>')}"
        )
    return batch_size // info.world_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """One seed per (run, epoch, rank): resuming at an epoch boundary replays exactly the same randomness."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def worker_init_fn(worker_id: int) -> None:
    """DataLoader workers: numpy/random seeded from the loader's (seeded) generator, distinct per worker."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def set_deterministic(deterministic: bool | None = None) -> bool:
    """cuDNN autotuning is 10-30% faster but not bitwise reproducible; CPU runs are deterministic either way.

    Default: ICH_DETERMINISTIC=1 in the environment turns autotuning off.
    """
    if deterministic is None:
        deterministic = os.environ.get("ICH_DETERMINISTIC", "0") not in ("", "0", "false")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    return deterministic


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
