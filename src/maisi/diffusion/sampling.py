"""The sampling loop (one short function) and per-sample seeded noise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from tqdm import tqdm

from maisi.diffusion.schedulers import Generators, Scheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One torch.Generator per sample, seeded with its own seed."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def make_noise(
    shape_per_sample: Sequence[int],
    seeds: Sequence[int],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """len(seeds)×shape noise; sample k depends only on seeds[k], so it is the same at any batch size."""
    if len(seeds) == 0:
        raise ValueError("need at least one seed")
    gens = make_generators(seeds)  # CPU generators: the same numbers on every device
    return torch.stack([torch.randn(tuple(shape_per_sample), generator=g, dtype=dtype) for g in gens]).to(
        device
    )


def sample(
    denoiser: Denoiser,
    scheduler: Scheduler,
    noise: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """Run `scheduler.timesteps` from `noise` to x0; `generator` (one per sample for seed-per-sample)
    feeds stochastic steps (DDPM); `autocast` (e.g. torch.float16) runs the denoiser in mixed precision."""
    x = noise
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling")):
        t_batch = t.float().to(x.device).expand(x.shape[0])
        ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else nullcontext()
        with ctx:
            out = denoiser(x, t_batch)
        x = scheduler.step(out.to(x.dtype), t, x, generator=generator)
        if callback is not None:
            callback(i, t, x)
    return x
