"""torch.distributed plumbing: one process with no set-up, or several under torchrun (gloo/nccl)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from maisi.device import pick_device


@dataclass(frozen=True)
class World:
    """Where this process sits: rank, world size and the device it computes on."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: str | None = None) -> World:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else a single-process world.

    `device`: "cpu", "cuda" or None (cuda when available). nccl on GPU, gloo on CPU."""
    want = str(pick_device(device))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want.startswith("cuda"):
        index = local_rank if size > 1 or want == "cuda" else torch.device(want).index or 0
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def wrap(model: nn.Module, world: World) -> nn.Module:
    """DistributedDataParallel around `model` when several processes train, else `model` itself."""
    if not world.distributed or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def mean_over_ranks(values: dict[str, float], world: World) -> dict[str, float]:
    """Average scalar metrics over all ranks (every rank must call it with the same keys)."""
    if not world.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return {k: float(v) / world.size for k, v in zip(keys, t.tolist())}
