"""Process-group set-up for one process, one GPU, or ``torchrun --nproc_per_node N -m clipn_train``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from clipn_runtime.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto`` (the local GPU when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Under torchrun (``world_size`` > 1) each rank takes the GPU of its ``local_rank``; ``cuda:N`` names one GPU
    for every rank, so it is refused there (choose the GPUs with ``CUDA_VISIBLE_DEVICES`` instead).
    """
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if device.index is not None and world_size > 1:
            raise UserError(
                f"--device {spec}: torchrun started {world_size} processes and each uses the GPU of its "
                "LOCAL_RANK, so one GPU index cannot apply to all of them; pass --device cuda (or auto) and pick "
                "the GPUs with CUDA_VISIBLE_DEVICES, e.g. CUDA_VISIBLE_DEVICES=2,3 torchrun --nproc_per_node 2 ..."
            )
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: no CUDA GPU is visible to torch on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
            )
    return device


def init_distributed(device_spec: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment, or run as a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank, world)
    if world <= 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    chosen = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
    if not dist.is_initialized():
        dist.init_process_group(backend=chosen)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
