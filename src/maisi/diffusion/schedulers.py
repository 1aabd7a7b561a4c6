"""Scheduler contract shared by DDPM, DDIM and rectified flow, and `make_scheduler`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from maisi.config import SchedulerConfig

Generators = torch.Generator | Sequence[torch.Generator] | None


class Scheduler(Protocol):
    """What every scheduler offers; see ddpm.py, ddim.py and rflow.py."""

    timesteps: torch.Tensor

    def set_timesteps(self, num_inference_steps: int, latent_shape: Sequence[int] | None = None) -> None: ...

    def step(
        self,
        model_output: torch.Tensor,
        t: float | torch.Tensor,
        x: torch.Tensor,
        *,
        generator: Generators = None,
    ) -> torch.Tensor: ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def sample_training_timesteps(
        self, n: int, latent_shape: Sequence[int] | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append singleton dims to `v` (shape N or scalar) so it broadcasts against an `ndim` tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def per_sample(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as a float tensor broadcastable to `x`: a scalar, or one per batch element."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 1 and t.numel() not in (1, x.shape[0]):
        raise ValueError(f"need one timestep or one per sample ({x.shape[0]}), got {t.numel()}")
    return append_dims(t.reshape(-1) if t.ndim else t, x.ndim)


def spatial_shape(latent_shape: Sequence[int]) -> tuple[int, ...]:
    """Spatial extent of a latent: `latent_shape` is either (X, Y[, Z]) or a full N×C×X×Y[×Z] shape."""
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) in (4, 5):
        shape = shape[2:]
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(
            f"latent_shape must be (X, Y[, Z]) or N×C×X×Y[×Z] with positive sizes, got {latent_shape}"
        )
    return shape


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like `x`; a list of generators draws sample k from generator k."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, dtype=x.dtype, generator=generator, device=x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"need one generator per sample ({x.shape[0]}), got {len(generator)}")
    return torch.stack(
        [
            torch.randn(x.shape[1:], dtype=x.dtype, generator=g, device=g.device).to(x.device)
            for g in generator
        ]
    )


def make_scheduler(config: SchedulerConfig) -> Scheduler:
    """Build the scheduler named by `config.kind` ("ddpm", "ddim" or "rflow")."""
    from maisi.diffusion.ddim import DDIMScheduler
    from maisi.diffusion.ddpm import DDPMScheduler
    from maisi.diffusion.rflow import RFlowScheduler

    kinds = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "rflow": RFlowScheduler}
    if config.kind not in kinds:
        raise ValueError(f"unknown scheduler kind {config.kind!r}; allowed: {sorted(kinds)}")
    scheduler = kinds[config.kind](config)
    scheduler.set_timesteps(config.num_inference_steps)
    return scheduler
