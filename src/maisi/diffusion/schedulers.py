"""Noise schedulers with one small contract: DDPM, DDIM and rectified flow (REFERENCE §2).

Contract: `set_timesteps(n, latent_shape)`, `.timesteps` (descending), `step(model_output, t, x)`,
`add_noise(x0, noise, t)`, `training_target(x0, noise, t)`, `sample_training_timesteps(n, shape, g)`.
Timesteps live in [0, T] as floats; the networks embed them as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from maisi.config import SchedulerConfig

Generators = torch.Generator | Sequence[torch.Generator] | None


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions so that `t` broadcasts against a tensor of `ndim` dims."""
    return t.reshape(*t.shape, *([1] * (ndim - t.ndim)))


def _per_sample(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    return append_dims(t.expand(x.shape[0]) if t.ndim == 0 else t, x.ndim)


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Gaussian noise like x; with one generator per sample, sample k's noise depends on its own only."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generator]).to(x)


class Scheduler(Protocol):
    num_train_timesteps: int
    timesteps: torch.Tensor
    prediction: str  # "epsilon" or "velocity"

    def set_timesteps(self, num_inference_steps: int, latent_shape: Sequence[int] | None = None) -> None: ...
    def step(self, model_output: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor,
             generator: Generators = None) -> torch.Tensor: ...
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def sample_training_timesteps(self, n: int, latent_shape: Sequence[int],
                                  generator: torch.Generator | None = None) -> torch.Tensor: ...


def _check_steps(n: int, T: int) -> None:
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in 1..{T}, got {n}")


class _Discrete:
    """Shared parts of DDPM and DDIM: scaled-linear betas and ε-prediction."""

    prediction = "epsilon"

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.num_train_timesteps = T = config.num_train_timesteps
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.set_timesteps(config.num_inference_steps)

    def set_timesteps(self, num_inference_steps: int, latent_shape: Sequence[int] | None = None) -> None:
        _check_steps(num_inference_steps, self.num_train_timesteps)
        ts = self._spacing(num_inference_steps)
        self.timesteps = torch.from_numpy(ts.copy()).float()
        # Each step goes to the next listed timestep (-1 after the last: alpha_prev = 1).
        self._prev = {int(t): int(p) for t, p in zip(ts, [*ts[1:], -1])}

    def _alphas(self, t: float | torch.Tensor) -> tuple[float, float]:
        ti = int(round(float(t)))
        if ti not in self._prev:
            raise ValueError(f"t={float(t)} is not one of this scheduler's timesteps; call set_timesteps first")
        prev = self._prev[ti]
        a_t = float(self.alphas_cumprod[ti])
        a_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else 1.0
        return a_t, a_prev

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x0.device)[t.long()]
        a = append_dims(a, x0.ndim)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise

    def sample_training_timesteps(self, n: int, latent_shape: Sequence[int],
                                  generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).float()


class DDPMScheduler(_Discrete):
    """DDPM ancestral sampling, fixed-small variance, no clipping.

    Timesteps as MONAI's (linspace(T − 1, 0, n), rounded). With fewer than T steps each step uses the
    posterior between consecutive listed timesteps (MONAI always uses t − 1, which is wrong when strided).
    """

    @staticmethod
    def _spacing_for(n: int, T: int) -> np.ndarray:
        return np.linspace(T - 1, 0, n).round().astype(np.int64)

    def _spacing(self, n: int) -> np.ndarray:
        return self._spacing_for(n, self.num_train_timesteps)

    def step(self, model_output: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor,
             generator: Generators = None) -> torch.Tensor:
        a_t, a_prev = self._alphas(t)
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        x0 = (x - math.sqrt(1 - a_t) * model_output) / math.sqrt(a_t)
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * x
        if round(float(t)) == 0:
            return mean
        variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
        return mean + math.sqrt(variance) * randn_like(x, generator)


class DDIMScheduler(_Discrete):
    """Deterministic DDIM (η = 0): any number of steps for an ε-prediction model.

    Evenly strided timesteps k·⌊T/n⌋ (descending), so that each step lands on the next listed one.
    """

    def _spacing(self, n: int) -> np.ndarray:
        return (np.arange(n) * (self.num_train_timesteps // n))[::-1].astype(np.int64)

    def step(self, model_output: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor,
             generator: Generators = None) -> torch.Tensor:
        a_t, a_prev = self._alphas(t)
        x0 = (x - math.sqrt(1 - a_t) * model_output) / math.sqrt(a_t)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * model_output


def time_shift(t: torch.Tensor | float, spatial: Sequence[int], base_numel: int, T: int) -> torch.Tensor | float:
    """Resolution-dependent shift t' = r t / (1 + (r − 1) t), r = (numel / base)^(1/dims), t in units of T."""
    r = (float(np.prod(spatial)) / base_numel) ** (1.0 / len(spatial))
    s = t / T
    return r * s / (1 + (r - 1) * s) * T


class RectifiedFlowScheduler:
    """Rectified flow: x_t = (1 − t/T) x0 + (t/T) ε, velocity target v = x0 − ε, Euler steps."""

    prediction = "velocity"

    def __init__(self, config: SchedulerConfig, spatial_dims: int = 3):
        self.config = config
        self.num_train_timesteps = config.num_train_timesteps
        self.spatial_dims = spatial_dims
        self.set_timesteps(config.num_inference_steps)

    def set_timesteps(self, num_inference_steps: int, latent_shape: Sequence[int] | None = None) -> None:
        T, c = self.num_train_timesteps, self.config
        _check_steps(num_inference_steps, T)
        ts = [(1.0 - i / num_inference_steps) * T for i in range(num_inference_steps)]
        if c.use_timestep_transform and latent_shape is not None:
            spatial = list(latent_shape)[-self.spatial_dims:]
            ts = [float(time_shift(t, spatial, c.base_numel, T)) for t in ts]
        if c.reference_timesteps:  # quirk: the reference keeps them as float16
            self.timesteps = torch.from_numpy(np.array(ts).astype(np.float16))
        else:
            self.timesteps = torch.tensor(ts, dtype=torch.float64).float()
        self._next = {i: (float(self.timesteps[i + 1]) if i + 1 < len(ts) else 0.0) for i in range(len(ts))}

    def _index(self, t: float | torch.Tensor) -> int:
        i = int(torch.argmin((self.timesteps.double() - float(t)).abs()))
        if abs(float(self.timesteps[i]) - float(t)) > 1e-3:
            raise ValueError(f"t={float(t)} is not one of this scheduler's timesteps; call set_timesteps first")
        return i

    def step(self, model_output: torch.Tensor, t: float | torch.Tensor, x: torch.Tensor,
             generator: Generators = None) -> torch.Tensor:
        i = self._index(t)
        if self.config.reference_timesteps:  # quirk: int() truncation of the next step, float16 arithmetic
            dt = float(self.timesteps[i] - int(self._next[i])) / self.num_train_timesteps
        else:
            dt = (float(self.timesteps[i]) - self._next[i]) / self.num_train_timesteps
        return x + model_output * dt

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        keep = 1 - _per_sample(t, x0) / self.num_train_timesteps
        return keep * x0 + (1 - keep) * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x0 - noise

    def sample_training_timesteps(self, n: int, latent_shape: Sequence[int],
                                  generator: torch.Generator | None = None) -> torch.Tensor:
        t = torch.rand((n,), generator=generator) * self.num_train_timesteps
        if self.config.use_timestep_transform:
            t = time_shift(t, list(latent_shape)[-self.spatial_dims:], self.config.base_numel, self.num_train_timesteps)
        return t


# A model trained with one schedule can be sampled with these (DDPM-trained UNets also run DDIM).
COMPATIBLE_SAMPLERS = {"rflow": ("rflow",), "ddpm": ("ddpm", "ddim"), "ddim": ("ddpm", "ddim")}


def make_scheduler(config: SchedulerConfig, spatial_dims: int = 3) -> Scheduler:
    """The scheduler a config names."""
    if config.kind == "ddpm":
        return DDPMScheduler(config)
    if config.kind == "ddim":
        return DDIMScheduler(config)
    if config.kind == "rflow":
        return RectifiedFlowScheduler(config, spatial_dims)
    raise ValueError(f"unknown scheduler kind {config.kind!r}; choose ddpm, ddim or rflow")
