"""Guidance wrappers and the sampling loop with the real tiny-preset UNet and ControlNet."""

import pytest
import torch

from maisi.config import SchedulerConfig, preset
from maisi.diffusion.guidance import ClassifierFreeGuidance, ConditionedDenoiser
from maisi.diffusion.sampling import make_noise, sample
from maisi.diffusion.schedulers import make_scheduler
from maisi.labels import region_one_hot
from maisi.networks import build


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    cfg = preset("tiny")
    unet, ctrl = build("unet", cfg).eval(), build("controlnet", cfg).eval()
    with torch.no_grad():  # zero-initialised output layers would hide a wiring error
        for p in [*unet.parameters(), *ctrl.parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    return cfg, unet, ctrl


def _conditions(cfg, n):
    c = {"spacing": torch.full((n, 3), 1.5)}
    if cfg.unet.include_region_input:
        c["top_region"] = torch.tensor([region_one_hot(1)] * n, dtype=torch.float32)
        c["bottom_region"] = torch.tensor([region_one_hot(2)] * n, dtype=torch.float32)
    if cfg.unet.num_class_embeds is not None:
        c["modality"] = torch.full((n,), 1, dtype=torch.long)
    return c


@torch.no_grad()
def test_batched_guidance_equals_two_forwards_and_controlnet_matters(nets):
    cfg, unet, ctrl = nets
    assert cfg.unet.num_class_embeds is not None  # the tiny preset has a modality input, so guidance has two branches
    n, lat = 2, 8
    mask = torch.randint(0, 5, (n, 1, 4 * lat, 4 * lat, 4 * lat))
    cond = ConditionedDenoiser(unet, ctrl, mask=mask, **_conditions(cfg, n))
    uncond = cond.with_modality(torch.zeros(n, dtype=torch.long))
    x = torch.randn(n, cfg.unet.in_channels, lat, lat, lat, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700.0, 300.0])
    one = ClassifierFreeGuidance(cond, uncond, 3.0)
    two = ClassifierFreeGuidance(cond, uncond, 3.0, batched=False)
    assert one.joint is not None and two.joint is None
    c, u = cond(x, t), uncond(x, t)
    assert not torch.allclose(c, u)  # modality 0 really is another branch
    batched = one(x, t)
    assert torch.allclose(batched, u + 3.0 * (c - u), atol=1e-4)
    assert torch.equal(ClassifierFreeGuidance(cond, uncond, 0.0)(x, t), c)
    plain = ConditionedDenoiser(unet, **_conditions(cfg, n))
    assert not torch.allclose(plain(x, t), c)  # ControlNet residuals reach the UNet


@torch.no_grad()
def test_tiny_rflow_sampling_is_per_seed_deterministic(nets):
    cfg, unet, _ = nets
    steps = 6  # few steps: a real-network forward is slow on a shared CPU
    sched = make_scheduler(SchedulerConfig(kind="rflow", num_inference_steps=steps))
    shape = (cfg.unet.in_channels, 8, 8, 8)
    sched.set_timesteps(steps, shape)
    seen = []
    den = ConditionedDenoiser(unet, **_conditions(cfg, 2))
    z = sample(den, sched, make_noise(shape, [11, 12]), callback=lambda i, t, x: seen.append(t))
    assert z.shape == (2, *shape) and torch.isfinite(z).all() and len(seen) == steps
    alone = sample(ConditionedDenoiser(unet, **_conditions(cfg, 1)), sched, make_noise(shape, [12]))
    assert torch.allclose(z[1:], alone, atol=1e-5) and not torch.allclose(z[0], z[1])
