"""Schedulers against MONAI's (timesteps and steps), oracle sampling, per-sample determinism, guidance."""

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler as MonaiDDIM
from monai.networks.schedulers import DDPMScheduler as MonaiDDPM
from monai.networks.schedulers import RFlowScheduler as MonaiRFlow

from maisi.config import SchedulerConfig
from maisi.diffusion.guidance import ClassifierFreeGuidance, ConditionedDenoiser, tumor_free_mask
from maisi.diffusion.sampling import make_generators, make_noise, sample
from maisi.diffusion.schedulers import make_scheduler


def _monai_ddpm(n):
    s = MonaiDDPM(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, schedule="scaled_linear_beta",
                  clip_sample=False)
    s.set_timesteps(n)
    return s


@pytest.mark.parametrize("n", [1000, 50, 7])
def test_ddpm_timesteps_and_noising_match_monai(n):
    ours = make_scheduler(SchedulerConfig(kind="ddpm", num_inference_steps=n))
    ref = _monai_ddpm(n)
    assert torch.equal(ours.timesteps.long(), ref.timesteps.long())
    x, eps = torch.randn(2, 4, 6, 6, 6), torch.randn(2, 4, 6, 6, 6)
    t = torch.tensor([10, 900])
    torch.testing.assert_close(ours.add_noise(x, eps, t.float()), ref.add_noise(x, eps, t), atol=1e-6, rtol=1e-6)
    assert torch.equal(ours.training_target(x, eps, t), eps)


def test_ddpm_steps_match_monai_at_1000_steps():
    ours = make_scheduler(SchedulerConfig(kind="ddpm", num_inference_steps=1000))
    ref = _monai_ddpm(1000)
    torch.manual_seed(0)
    x, eps = torch.randn(2, 4, 6, 6, 6), torch.randn(2, 4, 6, 6, 6)
    for t in [999, 500, 1, 0]:
        expected, _ = ref.step(eps, t, x, generator=torch.Generator().manual_seed(5))
        got = ours.step(eps, float(t), x, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_strided_ddpm_uses_the_posterior_between_listed_steps():
    ours = make_scheduler(SchedulerConfig(kind="ddpm", num_inference_steps=10))
    t, t_prev = int(ours.timesteps[0]), int(ours.timesteps[1])
    x0, eps = torch.rand(1, 2, 3, 3, 3), torch.randn(1, 2, 3, 3, 3)
    a_t, a_p = float(ours.alphas_cumprod[t]), float(ours.alphas_cumprod[t_prev])
    x_t = ours.add_noise(x0, eps, torch.tensor([float(t)]))
    # q(x_prev | x_t, x0) mean, DDPM eq. 7 with the strided alphas.
    beta = 1 - a_t / a_p
    mean = (a_p**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_p) / (1 - a_t)) * x_t
    std = ((1 - a_p) / (1 - a_t) * beta) ** 0.5
    g = torch.Generator().manual_seed(9)
    got = ours.step(eps, float(t), x_t, generator=g)
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, mean + std * noise, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [50, 10])
def test_ddim_steps_match_monai(n):
    ours = make_scheduler(SchedulerConfig(kind="ddim", num_inference_steps=n))
    ref = MonaiDDIM(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, schedule="scaled_linear_beta",
                    clip_sample=False)
    ref.set_timesteps(n)
    assert len(ours.timesteps) == n and ours.timesteps[-1] == 0
    torch.manual_seed(1)
    x, eps = torch.randn(1, 4, 5, 6, 7), torch.randn(1, 4, 5, 6, 7)
    for t in ours.timesteps[[0, n // 2, -1]]:  # MONAI steps to t − T//n, as ours does from these timesteps
        expected, _ = ref.step(eps, int(t), x, eta=0.0)
        torch.testing.assert_close(ours.step(eps, float(t), x), expected, atol=1e-5, rtol=1e-5)


def _monai_rflow(n, shape):
    s = MonaiRFlow(num_train_timesteps=1000, use_discrete_timesteps=False, use_timestep_transform=True,
                   sample_method="uniform", scale=1.4)
    s.set_timesteps(n, input_img_size_numel=int(np.prod(shape)))
    return s


@pytest.mark.parametrize("shape", [(32, 32, 32), (64, 64, 32), (16, 16, 8), (128, 128, 192)])
def test_rflow_reference_mode_is_bit_faithful(shape):
    ours = make_scheduler(SchedulerConfig(kind="rflow", reference_timesteps=True))
    ours.set_timesteps(30, shape)
    ref = _monai_rflow(30, shape)
    assert ours.timesteps.dtype == ref.timesteps.dtype == torch.float16
    assert torch.equal(ours.timesteps, ref.timesteps)
    nxt = torch.cat((ref.timesteps[1:], torch.tensor([0], dtype=ref.timesteps.dtype)))
    torch.manual_seed(2)
    x, v = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 4, 4, 4, 4)
    for t, tn in zip(ref.timesteps, nxt):
        expected, _ = ref.step(v, t, x, tn)
        assert torch.equal(ours.step(v, t, x), expected)


@pytest.mark.parametrize("shape", [(32, 32, 32), (64, 64, 32), (16, 16, 8)])
def test_rflow_clean_mode_follows_the_reference_schedule_in_fp32(shape):
    ours = make_scheduler(SchedulerConfig(kind="rflow"))
    ours.set_timesteps(30, shape)
    ref = _monai_rflow(30, shape)
    assert ours.timesteps.dtype == torch.float32
    torch.testing.assert_close(ours.timesteps, ref.timesteps.float(), rtol=1e-3, atol=0.3)
    # Clean steps add up to exactly T: no truncation loss.
    dts = [(float(t) - ours._next[i]) for i, t in enumerate(ours.timesteps)]
    assert sum(dts) == pytest.approx(1000.0, abs=1e-3)
    if shape == (32, 32, 32):  # shift r = 1: the plain linear schedule
        torch.testing.assert_close(ours.timesteps, torch.tensor([1000 * (1 - i / 30) for i in range(30)]))


def test_rflow_training_side_matches_monai():
    ours = make_scheduler(SchedulerConfig(kind="rflow"))
    ref = MonaiRFlow(num_train_timesteps=1000, use_discrete_timesteps=False, use_timestep_transform=True,
                     sample_method="uniform")
    x = torch.randn(3, 4, 16, 16, 8)
    torch.manual_seed(3)
    t_ref = ref.sample_timesteps(x)
    torch.manual_seed(3)
    t_ours = ours.sample_training_timesteps(3, x.shape)
    torch.testing.assert_close(t_ours, t_ref)
    eps = torch.randn_like(x)
    torch.testing.assert_close(ours.add_noise(x, eps, t_ours), ref.add_noise(x, eps, t_ref))
    assert torch.equal(ours.training_target(x, eps, t_ours), x - eps)


def _oracle(sched, x0):
    """A perfect denoiser for one known clean latent."""
    T = sched.num_train_timesteps

    def denoiser(x, t):
        if sched.prediction == "velocity":
            s = (t / T).view(-1, 1, 1, 1, 1)
            eps = (x - (1 - s) * x0) / s
            return x0 - eps
        a = sched.alphas_cumprod[t.long()].view(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return denoiser


@pytest.mark.parametrize("kind, steps, tol", [("rflow", 30, 1e-4), ("ddim", 20, 1e-3), ("rflow", 5, 1e-4)])
def test_oracle_denoiser_recovers_the_clean_latent(kind, steps, tol):
    sched = make_scheduler(SchedulerConfig(kind=kind, num_inference_steps=steps))
    x0 = torch.rand(2, 4, 6, 6, 6)
    sched.set_timesteps(steps, x0.shape)
    out = sample(_oracle(sched, x0), sched, make_noise((4, 6, 6, 6), [0, 1]))
    torch.testing.assert_close(out, x0, atol=tol, rtol=0)


@pytest.mark.parametrize("kind", ["rflow", "ddpm"])
def test_sample_k_does_not_depend_on_batch(kind):
    sched = make_scheduler(SchedulerConfig(kind=kind, num_inference_steps=8))
    sched.set_timesteps(8, (4, 4, 4))

    def denoiser(x, t):
        return 0.1 * x + 0.001 * t.view(-1, 1, 1, 1, 1)

    seeds = [11, 12, 13]
    batch = sample(denoiser, sched, make_noise((2, 4, 4, 4), seeds), generator=make_generators([s + 1000 for s in seeds]))
    alone = sample(denoiser, sched, make_noise((2, 4, 4, 4), seeds[1:2]), generator=make_generators([1012]))
    assert torch.equal(batch[1:2], alone)
    again = sample(denoiser, sched, make_noise((2, 4, 4, 4), seeds), generator=make_generators([s + 1000 for s in seeds]))
    assert torch.equal(batch, again)
    assert not torch.equal(batch[0], batch[1])


def test_scheduler_errors():
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        make_scheduler(SchedulerConfig(kind="rflow")).set_timesteps(0)
    sched = make_scheduler(SchedulerConfig(kind="rflow"))
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        sched.step(torch.zeros(1), 123.456, torch.zeros(1))


class _FakeUNet(torch.nn.Module):
    def forward(self, x, t, *, spacing=None, top_region=None, bottom_region=None, modality=None,
                down_residuals=None, mid_residual=None):
        out = x * 0 + modality.float().view(-1, 1, 1, 1, 1)
        if mid_residual is not None:
            out = out + mid_residual.mean()
        return out


class _FakeControlNet(torch.nn.Module):
    def forward(self, x, t, mask, *, modality=None):
        return [x * 0], mask.float().mean().expand(1)


def test_guidance_combines_branches_and_scale_zero_is_conditional_only():
    unet = _FakeUNet()
    cond = ConditionedDenoiser(unet, modality=torch.tensor([3]))
    uncond = cond.with_modality(torch.tensor([0]))
    x, t = torch.zeros(1, 1, 2, 2, 2), torch.tensor([500.0])
    assert torch.all(ClassifierFreeGuidance(cond, uncond, 0.0)(x, t) == 3)
    assert torch.all(ClassifierFreeGuidance(cond, uncond, 2.0)(x, t) == 6)  # 0 + 2·(3 − 0)
    with pytest.raises(ValueError, match=">= 0"):
        ClassifierFreeGuidance(cond, uncond, -1)
    mask = torch.full((1, 1, 8, 8, 8), 4)
    ctrl = ConditionedDenoiser(unet, _FakeControlNet(), modality=torch.tensor([1]), mask=mask)
    assert torch.all(ctrl(x, t) == 5)
    with pytest.raises(ValueError, match="needs a label mask"):
        ConditionedDenoiser(unet, _FakeControlNet())


def test_tumor_free_mask_gives_tumours_their_host():
    mask = np.zeros((1, 1, 10, 10, 10), np.uint8)
    mask[0, 0, 2:8, 2:8, 2:8] = 1  # liver
    mask[0, 0, 4:6, 4:6, 4:6] = 26  # hepatic tumour
    out = tumor_free_mask(mask)
    assert set(np.unique(out)) == {0, 1} and np.array_equal(out == 0, mask == 0)
    t = tumor_free_mask(torch.from_numpy(mask))
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(out))
