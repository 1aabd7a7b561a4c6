"""Rectified flow (MAISI v2): linear path x_t = (1 − t/T)·x0 + (t/T)·ε, v = x0 − ε, Euler sampling."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import numpy as np
import torch

from maisi.config import SchedulerConfig
from maisi.diffusion.schedulers import Generators, per_sample, spatial_shape


def shift_timesteps(t: torch.Tensor, numel: int, base_numel: int, spatial_dims: int, T: int) -> torch.Tensor:
    """Resolution shift t' = r·t/(1 + (r − 1)·t) on t/T ∈ [0, 1], r = (numel/base_numel)^(1/spatial_dims)."""
    r = (numel / base_numel) ** (1.0 / spatial_dims)
    s = t / T
    return r * s / (1 + (r - 1) * s) * T


class RFlowScheduler:
    """Euler sampler over (optionally shifted) timesteps; clean float64→float32 or the reference's fp16 quirk."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config = config or SchedulerConfig(kind="rflow")
        self.set_timesteps(config.num_inference_steps)

    def _shift(self, t: torch.Tensor, latent_shape: Sequence[int] | None) -> torch.Tensor:
        if not self.config.use_timestep_transform:
            return t
        if latent_shape is None:  # no size given: the base size, where the shift is the identity
            return t
        shape = spatial_shape(latent_shape)
        T = self.config.num_train_timesteps
        return shift_timesteps(t, prod(shape), self.config.base_numel, len(shape), T)

    def set_timesteps(self, num_inference_steps: int, latent_shape: Sequence[int] | None = None) -> None:
        """t_i = (1 − i/n)·T, shifted for `latent_shape` (None: unshifted); the step after the last is t = 0."""
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in 1..{T}, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        if self.config.reference_timesteps:
            self.timesteps = self._reference_timesteps(num_inference_steps, latent_shape)
        else:
            t = (1.0 - torch.arange(num_inference_steps, dtype=torch.float64) / num_inference_steps) * T
            self.timesteps = self._shift(t, latent_shape).float()
        nxt = torch.cat([self.timesteps[1:], self.timesteps.new_zeros(1)])
        self._next = {float(a): float(b) for a, b in zip(self.timesteps, nxt)}

    def _reference_timesteps(self, n: int, latent_shape: Sequence[int] | None) -> torch.Tensor:
        # as MONAI's RFlowScheduler: python-float t, float32 tensor ratio, stored as float16
        T = self.config.num_train_timesteps
        ts = [(1.0 - i / n) * T for i in range(n)]
        if self.config.use_timestep_transform and latent_shape is not None:
            shape = spatial_shape(latent_shape)
            numel = torch.prod(torch.tensor(shape))
            r = (numel / self.config.base_numel) ** (1.0 / 3)
            ts = [(r * (t / T) / (1 + (r - 1) * (t / T))) * T for t in ts]
        return torch.from_numpy(np.array(ts).astype(np.float16))

    def next_timestep(self, t: float | torch.Tensor) -> float:
        """The timestep after `t` in the current schedule (0 after the last)."""
        try:
            return self._next[float(t)]
        except KeyError:
            raise ValueError(
                f"t = {float(t)} is not in the current schedule; call set_timesteps first"
            ) from None

    def step(
        self,
        model_output: torch.Tensor,
        t: float | torch.Tensor,
        x: torch.Tensor,
        *,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Euler step x ← x + v·(t − t_next)/T; `generator` unused (the flow is deterministic)."""
        T = self.config.num_train_timesteps
        t_next = self.next_timestep(t)
        if self.config.reference_timesteps:
            # quirk: t_next truncated with int(), difference taken in float16
            dt = float(torch.as_tensor(t, dtype=torch.float16) - int(t_next)) / T
        else:
            dt = (float(t) - t_next) / T
        return x + model_output * dt

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − t/T)·x0 + (t/T)·ε, t per sample."""
        s = per_sample(t, x0) / self.config.num_train_timesteps
        return ((1 - s) * x0 + s * noise).to(x0.dtype)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity target v = x0 − ε (independent of t)."""
        return x0 - noise

    def sample_training_timesteps(
        self, n: int, latent_shape: Sequence[int] | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform t in [0, T) (the released config's sample_method "uniform"), shifted like inference."""
        t = torch.rand(n, generator=generator, dtype=torch.float64) * self.config.num_train_timesteps
        return self._shift(t, latent_shape).float()
