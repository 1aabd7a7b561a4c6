"""The sampling loop and per-sample seeded noise."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from maisi.diffusion.schedulers import Generators, Scheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, so sample k depends on its own seed only."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def make_noise(
    shape: Sequence[int], seeds: Sequence[int], device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Initial noise of shape (len(seeds), *shape), each sample from its own seed, drawn on the CPU
    so that it is the same on every device and whatever the batch size."""
    gens = list(generators) if generators is not None else make_generators(seeds)
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device=device, dtype=dtype)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler: Scheduler,
    noise: torch.Tensor,
    *,
    generator: Generators = None,
    callback: Callable[[int, float, torch.Tensor], None] | None = None,
    progress: bool = False,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """Run the denoiser over the scheduler's timesteps, starting from `noise`.

    `generator` feeds the stochastic steps (DDPM), one per sample for batch-independent results;
    `autocast` runs the denoiser in that dtype (e.g. torch.bfloat16 / torch.float16 on GPU).
    """
    x = noise
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
        t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            out = denoiser(x, t_batch)
        x = scheduler.step(out.float(), t, x, generator=generator)
        if callback is not None:
            callback(i, float(t), x)
    return x
