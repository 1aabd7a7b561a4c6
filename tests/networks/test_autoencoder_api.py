"""Autoencoder API: bad inputs, forward modes, checkpoint round trip, memory-aware entry points."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from maisi.config import PRESETS, AutoencoderConfig
from maisi.io.checkpoint import save_pretrained
from maisi.networks import build, load_pretrained
from maisi.networks.autoencoder import Autoencoder
from maisi.networks.memory import GB, choose_splits, estimate_peak, estimate_streaming
from maisi.networks.stream import StreamPlan

TINY = AutoencoderConfig(channels=(4, 8, 8), num_res_blocks=(1, 1, 1), norm_num_groups=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Autoencoder(TINY).eval()


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.rand(1, 2, 8, 8, 8), "1 channel"),
        (torch.rand(1, 8, 8, 8), "5 dims"),
        (torch.rand(1, 1, 8, 10, 8), "multiple of 4"),
        (torch.full((1, 1, 8, 8, 8), float("nan")), "NaN or inf"),
        (torch.ones(1, 1, 8, 8, 8, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_images_raise(model, x, match):
    with pytest.raises(ValueError, match=match):
        model.encode(x)


def test_bad_latent_and_options_raise(model):
    with pytest.raises(ValueError, match="4 channel"):
        model.decode(torch.rand(1, 3, 2, 2, 2))
    with torch.no_grad(), pytest.raises(ValueError, match="split_axis"):
        model.decode(torch.rand(1, 4, 2, 2, 2), split_axis=3)
    with torch.no_grad(), pytest.raises(ValueError, match="dtype"):
        model.decode(torch.rand(1, 4, 2, 2, 2), dtype=torch.float64)


def test_forward_samples_in_training_and_uses_mean_in_eval(model):
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        recon, mu, sigma = model(x)
        assert torch.equal(recon, model.decode(mu)) and (sigma > 0).all()
        model.train()
        recon_train, _, _ = model(x)
        model.eval()
    assert not torch.allclose(recon, recon_train)


def test_build_and_checkpoint_round_trip(tmp_path, model):
    config = replace(PRESETS["tiny"], autoencoder=TINY)
    assert isinstance(build("autoencoder", config), Autoencoder)
    save_pretrained(tmp_path / "vae", model, config, "autoencoder")
    loaded, cfg, _ = load_pretrained(tmp_path / "vae")
    assert cfg.autoencoder == TINY
    z = torch.randn(1, 4, 2, 3, 2)
    with torch.no_grad():
        assert torch.equal(loaded.eval().decode(z), model.decode(z))


def test_smaller_budget_picks_more_splits():
    big = Autoencoder(AutoencoderConfig())
    shape = (1, 4, 32, 32, 32)
    ests = [estimate_peak(big, "decode", shape, k) for k in (1, 2, 4, 8)]
    assert ests == sorted(ests, reverse=True) and ests[0] > ests[-1]
    loose = choose_splits(big, "decode", shape, ests[0] / GB + 0.01)
    tight = choose_splits(big, "decode", shape, ests[2] / GB + 0.001)
    assert loose == 1 and tight > loose
    with pytest.raises(ValueError, match="needs at least"):
        choose_splits(big, "decode", shape, 0.05)


def test_within_is_exact_and_raises_when_impossible(model):
    torch.manual_seed(4)
    x = torch.rand(1, 1, 16, 12, 8)
    with torch.no_grad():
        mu, sigma = model.encode(x, num_splits=1)
        z = mu
        img = model.decode(z, num_splits=1)
    need1 = estimate_peak(model, "decode", tuple(z.shape), 1)
    small = (estimate_peak(model, "decode", tuple(z.shape), 16) + need1) / 2 / GB
    assert (model.decode_within(z, small) - img).abs().max() <= 1e-4
    assert (model.encode_within(x, 1.0)[0] - mu).abs().max() <= 1e-4
    assert (model.decode_within(z) - img).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="needs at least"):
        model.decode_within(z, 1e-6)


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖: 1 for zeros (or any output uncorrelated with the exact one)."""
    return float((approx - exact).norm() / exact.norm())


def test_sliding_window_fallback_only_when_asked(model):
    """Windows blend seams (and normalise per window), so the result is close to the unsplit decode but not
    equal; the tolerance is far below what zeros or noise reach (relative error 1)."""
    torch.manual_seed(5)
    z = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        exact = model.decode(z, num_splits=1)
        out = model.decode_within(z, 1e-4, sliding_window=True, roi_size=(6, 8, 8))
    assert out.shape == exact.shape == (1, 1, 32, 32, 32)
    assert rel_error(out, exact) < 0.35  # measured 0.21 (tiny random VAE, windows of 6 of 8 latent voxels)
    with pytest.raises(ValueError, match="needs at least"):
        model.decode_within(z, 1e-4)


def test_sliding_window_encode_returns_both_posteriors(model):
    x = torch.rand(1, 1, 32, 16, 16)
    mu, sigma = model.encode_within(x, 1e-5, sliding_window=True)  # window size chosen automatically
    assert mu.shape == sigma.shape == (1, 4, 8, 4, 4) and (sigma > 0).all()
    with torch.no_grad():
        exact_mu, exact_sigma = model.encode(x, num_splits=1)
        mu, sigma = model.encode_within(x, 1e-5, sliding_window=True, roi_size=(24, 16, 16))
    assert rel_error(mu, exact_mu) < 0.3 and rel_error(sigma, exact_sigma) < 0.1  # measured 0.13 and 0.02


def test_argmax_decode_reduces_each_segment_and_tile_to_class_indices():
    torch.manual_seed(0)
    classes = Autoencoder(AutoencoderConfig(out_channels=125, channels=(4, 8), num_res_blocks=(1, 1),
                                            norm_num_groups=2, upsample_mode="transposed_conv")).eval()
    with torch.no_grad():
        for p in classes.parameters():
            p.normal_(0, 0.3)  # logits far apart: ties cannot decide the argmax
        z = torch.randn(2, 4, 5, 7, 3)
        for kw in (dict(num_splits=1), dict(num_splits=3), dict(num_splits=7, split_axis=2),
                   dict(stream=StreamPlan(tile=3)), dict(stream=StreamPlan(tile=1))):
            index = classes.decode(z, argmax=True, **kw)
            assert index.dtype == torch.long and index.shape == (2, 1, 10, 14, 6)
            torch.testing.assert_close(index, classes.decode(z, **kw).argmax(1, keepdim=True), rtol=0, atol=0)
        assert len(index.unique()) > 20
    shape = (1, 4, 16, 16, 16)
    logits_gb = 125 * 32**3 * 4 / GB
    for k in (1, 4):
        assert estimate_peak(classes, "decode", shape, k) - estimate_peak(classes, "decode", shape, k, argmax=True) \
            > 1.5 * logits_gb * GB  # neither the logits nor their fp32 copy are held
    stream = StreamPlan(tile_bytes=2 * 1024**2, resident_bytes=0)
    assert estimate_streaming(classes, "decode", shape, stream) - estimate_streaming(
        classes, "decode", shape, stream, argmax=True) > 2 * logits_gb * GB
    with pytest.raises(ValueError, match="argmax is for exact decodes"):
        classes.encode_within(torch.rand(1, 1, 8, 8, 8), 1.0, argmax=True)


PEAK_SCRIPT = """
import sys, torch
from maisi.config import AutoencoderConfig
from maisi.networks.autoencoder import Autoencoder

def status(key):  # kB, from the kernel's accounting of this process
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1])

torch.manual_seed(0)
ae = Autoencoder(AutoencoderConfig(out_channels=125, channels=(4, 8), num_res_blocks=(1, 1), norm_num_groups=2,
                                   upsample_mode="transposed_conv")).eval()
z = torch.randn(1, 4, 128, 40, 20)
with torch.no_grad():
    ae.decode(z[..., :8, :8, :4], num_splits=8, argmax=True)  # the libraries' one-time buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = status("VmRSS")
    out = ae.decode(z, num_splits=32, argmax=sys.argv[1] == "argmax")
print((status("VmHWM") - base) / 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_an_argmax_decode_never_holds_the_class_logits(tmp_path):
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    grown = {mode: float(subprocess.run([sys.executable, str(script), mode], env=env, check=True, text=True,
                                        capture_output=True).stdout) for mode in ("logits", "argmax")}
    logits_mb = 125 * 256 * 80 * 40 * 4 / 1024**2  # 391 MB (the decoder upsamples once), against segments of ~50 MB
    # the same segment temporaries either way; the logits path also holds the logits
    assert grown["logits"] - grown["argmax"] > 0.6 * logits_mb, grown  # measured 350-370 MB
