"""DDPM (Ho et al. 2020) with scaled-linear betas, ε-prediction and fixed-small variance (REFERENCE §2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from maisi.config import SchedulerConfig
from maisi.diffusion.schedulers import Generators, per_sample, randn_like


class DDPMScheduler:
    """Ancestral DDPM sampler; timesteps are integers 0..T-1 stored as floats."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config = config or SchedulerConfig(kind="ddpm")
        T = config.num_train_timesteps
        # scaled-linear schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2 (as MONAI, float32)
        self.betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.set_timesteps(config.num_inference_steps)

    def set_timesteps(self, num_inference_steps: int, latent_shape: Sequence[int] | None = None) -> None:
        """n steps linspace(T − 1, 0, n) rounded, descending (as MONAI 1.6); `latent_shape` is unused."""
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in 1..{T}, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.linspace(T - 1, 0, num_inference_steps).round()
        nxt = torch.cat([self.timesteps[1:], torch.tensor([-1.0])])
        self._next = {int(a): int(b) for a, b in zip(self.timesteps, nxt)}

    def _index(self, t: torch.Tensor) -> torch.Tensor:
        return t.round().long().clamp(0, self.config.num_train_timesteps - 1)

    def _abar(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(x.device)[self._index(per_sample(t, x))]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε (Ho et al. eq. 4)."""
        abar = self._abar(t, x0)
        return (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(x0.dtype)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε-prediction: the target is the noise itself."""
        return noise

    def sample_training_timesteps(
        self, n: int, latent_shape: Sequence[int] | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform integer timesteps in [0, T) as floats."""
        return torch.randint(0, self.config.num_train_timesteps, (n,), generator=generator).float()

    def _prev(self, t: int) -> int:
        """The next (smaller) scheduled timestep after t; -1 after the last (ᾱ = 1 there)."""
        if t not in self._next:
            raise ValueError(f"t = {t} is not in the current schedule; call set_timesteps first")
        return self._next[t]

    def step(
        self,
        model_output: torch.Tensor,
        t: float | torch.Tensor,
        x: torch.Tensor,
        *,
        generator: Generators = None,
    ) -> torch.Tensor:
        """x_{t-1} from x_t and predicted ε: posterior mean (eq. 7) plus fixed-small variance noise if t > 0."""
        ti = int(round(float(t)))
        prev = self._prev(ti)
        ac = self.alphas_cumprod
        a_t = ac[ti]
        a_prev = ac[prev] if prev >= 0 else torch.tensor(1.0)
        # one-step transitions use the stored β_t (as MONAI); skipped steps the effective 1 − ᾱ_t/ᾱ_prev
        beta_t = self.betas[ti] if prev == ti - 1 else 1 - a_t / a_prev
        x0 = (x - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
        mean = (a_prev**0.5 * beta_t / (1 - a_t)) * x0 + ((1 - beta_t) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if ti <= 0:
            return mean
        variance = torch.clamp((1 - a_prev) / (1 - a_t) * beta_t, min=1e-20)
        return mean + variance**0.5 * randn_like(model_output, generator)
