"""Schedulers against MONAI's reference implementations, and their contract."""

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler as MonaiDDIM
from monai.networks.schedulers import DDPMScheduler as MonaiDDPM
from monai.networks.schedulers import RFlowScheduler as MonaiRFlow
from monai.networks.schedulers.rectified_flow import timestep_transform

from maisi.config import SchedulerConfig
from maisi.diffusion.rflow import shift_timesteps
from maisi.diffusion.schedulers import make_scheduler, spatial_shape

SHAPES = [(32, 32, 32), (64, 64, 32), (128, 128, 64), (16, 16, 8), (30, 40, 50)]


def monai_rflow(shape, n=30):
    m = MonaiRFlow(
        1000, use_discrete_timesteps=False, use_timestep_transform=True, sample_method="uniform", scale=1.4
    )
    m.set_timesteps(n, input_img_size_numel=torch.prod(torch.tensor(shape)))
    return m


def rflow(shape, n=30, **kw):
    s = make_scheduler(SchedulerConfig(kind="rflow", num_inference_steps=n, **kw))
    s.set_timesteps(n, shape)
    return s


@pytest.mark.parametrize("shape", SHAPES)
def test_rflow_reference_mode_is_bit_faithful_to_monai(shape):
    m, s = monai_rflow(shape), rflow(shape, reference_timesteps=True)
    assert s.timesteps.dtype == torch.float16 and torch.equal(s.timesteps, m.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, 3, generator=g)
    nxt = torch.cat((m.timesteps[1:], torch.tensor([0], dtype=m.timesteps.dtype)))
    for t, t_next in zip(m.timesteps, nxt):
        v = torch.randn(x.shape, generator=g)
        ours = s.step(v, t, x)
        assert torch.equal(ours, m.step(v, t, x, t_next)[0])
        x = ours


@pytest.mark.parametrize("shape", SHAPES)
def test_rflow_clean_mode_agrees_with_monai_to_float16_rounding(shape):
    m, s = monai_rflow(shape), rflow(shape)
    assert s.timesteps.dtype == torch.float32
    t = s.timesteps.double()
    # fp16 keeps 11 significant bits: |err| <= t * 2^-11
    assert ((t - m.timesteps.double()).abs() <= t * 2.0**-11 + 1e-9).all()
    assert t[0] == 1000 and (t[:-1] > t[1:]).all() and t[-1] > 0
    if shape == (32, 32, 32):  # base size: no shift, exact (1 - i/30)·T
        assert torch.allclose(t, 1000 - 1000 / 30 * torch.arange(30.0, dtype=torch.float64))


def test_rflow_shift_formula_pinned():
    # r = (64*64*32 / 32^3)^(1/3) = 4^(1/3); t = 500 -> r*0.5/(1+(r-1)*0.5)*1000
    r = 4 ** (1 / 3)
    got = shift_timesteps(torch.tensor([500.0], dtype=torch.float64), 64 * 64 * 32, 32**3, 3, 1000).item()
    assert got == pytest.approx(r * 0.5 / (1 + (r - 1) * 0.5) * 1000, rel=1e-12)
    assert got == pytest.approx(613.5118, abs=1e-3)


def test_rflow_training_add_noise_and_target_match_monai():
    m, s = monai_rflow((8, 8, 8)), rflow((8, 8, 8))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, 8, generator=g), torch.randn(3, 4, 8, 8, 8, generator=g)
    t = torch.tensor([0.0, 333.3, 999.0])
    assert torch.allclose(s.add_noise(x0, noise, t), m.add_noise(x0, noise, t), atol=1e-6)
    assert torch.equal(s.training_target(x0, noise, t), x0 - noise)
    assert torch.equal(s.add_noise(x0, noise, torch.zeros(3)), x0)


def test_rflow_training_timesteps_use_monai_shift():
    s = rflow(None)
    t = s.sample_training_timesteps(1000, (64, 64, 32), torch.Generator().manual_seed(0))
    # MONAI draws from the global RNG, so compare against its shift applied to the same uniform draw
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1000
    want = timestep_transform(u, torch.tensor(64 * 64 * 32), spatial_dim=3).float()
    assert torch.allclose(t, want, atol=1e-3) and t.shape == (1000,) and 0 <= t.min() and t.max() < 1000
    assert t.mean() > 550  # the shift pushes training toward noisy times for bigger latents


@pytest.mark.parametrize("n", [1000, 50])
def test_ddpm_matches_monai_scaled_linear(n):
    m = MonaiDDPM(1000, beta_start=0.0015, beta_end=0.0195, schedule="scaled_linear_beta", clip_sample=False)
    m.set_timesteps(n)
    s = make_scheduler(SchedulerConfig(kind="ddpm", num_inference_steps=n))
    assert torch.equal(s.timesteps.long(), m.timesteps)
    assert torch.equal(s.alphas_cumprod, m.alphas_cumprod)
    x = torch.randn(2, 4, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    if n == 1000:  # MONAI's DDPM step always goes to t-1, so only the full T-step schedule compares
        for t in (999, 500, 1, 0):
            ours = s.step(eps, float(t), x, generator=torch.Generator().manual_seed(5))
            ref = m.step(eps, t, x, generator=torch.Generator().manual_seed(5))[0]
            assert (ours - ref).abs().max() < 1e-5
    t = torch.tensor([10.0, 900.0])
    assert torch.allclose(s.add_noise(x, eps, t), m.add_noise(x, eps, t.long()), atol=1e-6)
    assert torch.equal(s.training_target(x, eps, t), eps)


@pytest.mark.parametrize("n", [50, 200, 1000])
def test_ddim_matches_monai(n):
    m = MonaiDDIM(1000, beta_start=0.0015, beta_end=0.0195, schedule="scaled_linear_beta", clip_sample=False)
    m.set_timesteps(n)
    s = make_scheduler(SchedulerConfig(kind="ddim", num_inference_steps=n))
    assert torch.equal(s.timesteps.long(), m.timesteps)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 4, 4, 4, generator=g)
    # MONAI steps to t - T//n, we to the next scheduled t: compare the steps where those coincide
    nxt = torch.cat([m.timesteps[1:], torch.tensor([-1])])
    same = [
        int(t) for t, u in zip(m.timesteps, nxt) if int(t) - 1000 // n == u or (u < 0 and int(t) < 1000 // n)
    ]
    assert len(same) >= 3 and same[-1] == 0
    for t in same:
        eps = torch.randn(x.shape, generator=g)
        assert (s.step(eps, float(t), x) - m.step(eps, t, x)[0]).abs().max() < 1e-5


def test_ddpm_per_sample_generators_are_batch_independent():
    s = make_scheduler(SchedulerConfig(kind="ddpm"))
    x = torch.zeros(3, 2, 4, 4)
    eps = torch.zeros_like(x)

    def gens(seeds):
        return [torch.Generator().manual_seed(k) for k in seeds]

    full = s.step(eps, 999.0, x, generator=gens([7, 8, 9]))
    alone = s.step(eps[1:2], 999.0, x[1:2], generator=gens([8]))
    assert torch.equal(full[1:2], alone) and not torch.equal(full[0], full[1])
    with pytest.raises(ValueError, match="one generator per sample"):
        s.step(eps, 999.0, x, generator=gens([1]))


@pytest.mark.parametrize("kind", ["ddpm", "rflow"])
def test_per_sample_timesteps_broadcast_in_training(kind):
    s = make_scheduler(SchedulerConfig(kind=kind))
    x0, noise = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    xt = s.add_noise(x0, noise, torch.tensor([0.0, 999.0]))
    assert xt[0].mean() > 0.99 and xt[1].mean() < 0.1
    with pytest.raises(ValueError, match="one per sample"):
        s.add_noise(x0, noise, torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("bad", [(4,), (4, 4, 4, 4, 4, 4), (0, 4, 4), (1, 4, 0, 4, 4)])
def test_bad_latent_shape_raises(bad):
    with pytest.raises(ValueError, match="latent_shape"):
        spatial_shape(bad)


def test_full_shape_and_spatial_shape_agree_and_bad_steps_raise():
    a, b = rflow((64, 64, 32)), rflow((1, 4, 64, 64, 32))
    assert torch.equal(a.timesteps, b.timesteps)
    with pytest.raises(ValueError, match="num_inference_steps"):
        a.set_timesteps(0, (8, 8, 8))
    with pytest.raises(ValueError, match="not in the current schedule"):
        a.step(torch.zeros(1), 123.456, torch.zeros(1))
