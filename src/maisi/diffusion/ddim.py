"""Deterministic DDIM (Song et al. 2021, eta = 0) for DDPM-trained ε-prediction models."""

from __future__ import annotations

import torch

from maisi.diffusion.ddpm import DDPMScheduler
from maisi.diffusion.schedulers import Generators


class DDIMScheduler(DDPMScheduler):
    """Same schedule and training as DDPM; any number of inference steps, no noise injected."""

    def step(
        self,
        model_output: torch.Tensor,
        t: float | torch.Tensor,
        x: torch.Tensor,
        *,
        generator: Generators = None,
    ) -> torch.Tensor:
        """x_prev = sqrt(ᾱ_prev)·x̂0 + sqrt(1 − ᾱ_prev)·ε̂ (Song et al. eq. 12, σ = 0); `generator` unused."""
        ti = int(round(float(t)))
        prev = self._prev(ti)
        a_t = self.alphas_cumprod[ti]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        x0 = (x - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * model_output
