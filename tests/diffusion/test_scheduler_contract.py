"""The scheduler contract (schedulers.py's docstring), one table-driven suite that every scheduler passes:
set_timesteps, .timesteps, step, add_noise, training_target, sample_training_timesteps, and their errors."""

from __future__ import annotations

import pytest
import torch

from maisi.config import SchedulerConfig
from maisi.diffusion.schedulers import make_scheduler

T = 1000
LATENT = (2, 3, 12, 12, 12)  # batch, channels, 12³ latent voxels: the rectified-flow time shift is active
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]

# name: (config, stochastic step, a perfect prediction follows add_noise step by step)
SCHEDULERS = {
    "ddpm": (SchedulerConfig(kind="ddpm"), True, False),
    "ddim": (SchedulerConfig(kind="ddim"), False, True),
    "rflow": (SchedulerConfig(kind="rflow", use_timestep_transform=False), False, True),
    "rflow-shifted": (SchedulerConfig(kind="rflow"), False, True),
    "rflow-reference": (SchedulerConfig(kind="rflow", reference_timesteps=True), False, False),  # fp16 quirks
}


@pytest.fixture(params=sorted(SCHEDULERS))
def case(request):
    return request.param


def scheduler(case: str, n: int = 5):
    s = make_scheduler(SCHEDULERS[case][0])
    s.set_timesteps(n, LATENT)
    return s


def tensors(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LATENT, generator=g).to(device, dtype) for _ in range(3)]


@pytest.mark.parametrize("n", [1, 2, 7, 30, T])
def test_set_timesteps_gives_n_decreasing_timesteps_in_range(case, n):
    ts = scheduler(case, n).timesteps
    assert ts.shape == (n,) and ts.is_floating_point()
    assert bool((ts[1:] < ts[:-1]).all())  # strictly decreasing
    assert 0 <= float(ts.min()) and float(ts.max()) <= T


@pytest.mark.parametrize("n", [0, T + 1])
def test_set_timesteps_refuses_a_count_outside_1_to_T(case, n):
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        scheduler(case).set_timesteps(n, LATENT)


def test_step_refuses_a_timestep_it_did_not_list(case):
    s = scheduler(case)
    x, out, _ = tensors()
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        s.step(out, (float(s.timesteps[0]) + float(s.timesteps[1])) / 2, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_keeps_shape_dtype_and_device(case, dtype, device):
    s = scheduler(case)
    x, out, _ = tensors(dtype=dtype, device=device)
    for t in s.timesteps:
        x = s.step(out, t, x, generator=torch.Generator().manual_seed(1))
        assert x.shape == LATENT and x.dtype == dtype and x.device.type == device
        assert bool(torch.isfinite(x).all())


def test_step_is_deterministic_given_the_generator_and_per_sample(case):
    """The same generator gives the same step; one generator per sample makes sample k's step its own (the same
    alone as in the batch); only a stochastic sampler depends on the generator at all."""
    s, stochastic = scheduler(case), SCHEDULERS[case][1]
    x, out, _ = tensors()
    t = s.timesteps[0]
    a = s.step(out, t, x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, s.step(out, t, x, generator=torch.Generator().manual_seed(3)))
    other = s.step(out, t, x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, other) is not stochastic
    batch = s.step(out, t, x, generator=[torch.Generator().manual_seed(10 + k) for k in range(len(x))])
    for k in range(len(x)):
        alone = s.step(out[k:k + 1], t, x[k:k + 1], generator=[torch.Generator().manual_seed(10 + k)])
        assert torch.equal(batch[k:k + 1], alone)


def test_add_noise_goes_from_the_clean_latent_at_0_to_noise_at_T(case):
    """x_t = s(t)·x0 + σ(t)·ε with s falling from ~1 to ~0 and σ rising from ~0 to ~1 as t grows."""
    s = scheduler(case)
    t = torch.tensor([0.0, 1.0, 250.0, 500.0, 750.0, T - 1.0])
    ones, zeros = torch.ones(len(t), 1, 2, 2, 2), torch.zeros(len(t), 1, 2, 2, 2)
    signal, sigma = s.add_noise(ones, zeros, t)[:, 0, 0, 0, 0], s.add_noise(zeros, ones, t)[:, 0, 0, 0, 0]
    assert float(signal[0]) >= 0.99 and float(sigma[0]) <= 0.05  # t = 0: (nearly) the identity
    assert float(signal[-1]) <= 0.05 and float(sigma[-1]) >= 0.99  # t = T − 1: (nearly) pure noise
    assert bool((signal[1:] < signal[:-1]).all()) and bool((sigma[1:] > sigma[:-1]).all())


def test_add_noise_takes_one_timestep_per_sample(case):
    s = scheduler(case)
    x0, noise, _ = tensors()
    t = torch.tensor([3.0, 700.0])
    both = s.add_noise(x0, noise, t)
    for k in range(2):
        torch.testing.assert_close(both[k:k + 1], s.add_noise(x0[k:k + 1], noise[k:k + 1], t[k:k + 1]))


def test_training_target_is_what_the_prediction_names(case):
    s = scheduler(case)
    x0, noise, _ = tensors()
    t = s.sample_training_timesteps(len(x0), LATENT, torch.Generator().manual_seed(0))
    target = s.training_target(x0, noise, t)
    assert s.prediction in ("epsilon", "velocity")
    assert torch.equal(target, noise if s.prediction == "epsilon" else x0 - noise)


def test_a_perfect_prediction_denoises(case):
    """Given its own training target, the last step returns the clean latent; a deterministic sampler's every
    step lands exactly where add_noise puts the next timestep."""
    s, exact_path = scheduler(case), SCHEDULERS[case][2]
    x0, noise, _ = tensors()
    ts = s.timesteps.tolist()
    for t, t_next in zip(ts, [*ts[1:], None]):  # None: past the last listed timestep, the clean latent
        tt = torch.full((len(x0),), t)
        x_next = s.step(s.training_target(x0, noise, tt), t, s.add_noise(x0, noise, tt),
                        generator=torch.Generator().manual_seed(0))
        if t_next is None:
            torch.testing.assert_close(x_next, x0, atol=1e-5, rtol=1e-5)
        elif exact_path:
            torch.testing.assert_close(x_next, s.add_noise(x0, noise, torch.full((len(x0),), t_next)),
                                       atol=1e-5, rtol=1e-5)


def test_sample_training_timesteps_are_reproducible_and_in_range(case):
    s = scheduler(case)
    t = s.sample_training_timesteps(64, LATENT, torch.Generator().manual_seed(5))
    assert t.shape == (64,) and t.is_floating_point()
    assert 0 <= float(t.min()) and float(t.max()) < T and len(t.unique()) > 32
    assert torch.equal(t, s.sample_training_timesteps(64, LATENT, torch.Generator().manual_seed(5)))
