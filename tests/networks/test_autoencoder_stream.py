"""Streaming encode/decode (networks.stream) equals the unsplit computation; the planner picks it when needed."""

import os
import subprocess
import sys

import pytest
import torch

from maisi.config import AutoencoderConfig
from maisi.networks.autoencoder import Autoencoder
from maisi.networks.memory import GB, estimate_peak, estimate_streaming, plan_memory
from maisi.networks.stream import Store, StreamPlan


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Autoencoder(AutoencoderConfig(channels=(8, 16, 32), num_res_blocks=(1, 2, 1), norm_num_groups=4)).eval()
    with torch.no_grad():  # GroupNorm affines away from (1, 0) so that a wrong statistic shows
        for mod in m.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m


LATENTS = [(10, 14, 18), (9, 13, 7)]


@pytest.mark.parametrize("size,tile,scratch", [(LATENTS[0], 13, None), (LATENTS[0], 17, "memory"), (LATENTS[1], 7, None),
                                              (LATENTS[1], 11, "memory"), ((3, 2, 5), 1, None), ((2, 3, 3), 2, "memory")])
def test_streaming_decode_equals_unsplit(model, size, tile, scratch, tmp_path):
    """Tiles never divide the sizes evenly; edges 1 and 2 are smaller than a 3-tap conv's halo."""
    z = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.decode(z)
        folder = tmp_path if scratch is None else "memory"
        out = model.decode(z, stream=StreamPlan(tile=tile, scratch=folder, resident_bytes=0))
    assert out.shape == ref.shape == (2, 1, *(4 * s for s in size))
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert os.listdir(tmp_path) == []  # scratch files are unlinked


@pytest.mark.parametrize("size,tile", [(LATENTS[0], 11), (LATENTS[1], 6), ((2, 3, 2), 1)])
def test_streaming_encode_equals_unsplit(model, size, tile, tmp_path):
    x = torch.rand(1, 1, *(4 * s for s in size), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mu, sigma = model.encode(x)
        mu2, sigma2 = model.encode(x, stream=StreamPlan(tile=tile, scratch=tmp_path, resident_bytes=0))
    assert (mu2 - mu).abs().max() <= 1e-5
    assert (sigma2 - sigma).abs().max() <= 1e-5


def test_streaming_bf16_matches_in_memory_bf16(model):
    z = torch.randn(1, 4, 6, 7, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp32 = model.decode(z)
        mem = model.decode(z, num_splits=3, dtype=torch.bfloat16)
        out = model.decode(z, stream=StreamPlan(tile=9, dtype=torch.bfloat16, scratch="memory"))
    bf16_error = (mem - fp32).abs().mean()
    # the same bf16 computation: tiles only change the fp32 accumulation order inside a conv, so the two
    # bf16 results differ far less than bf16 differs from fp32
    assert (out - mem).abs().mean() <= 0.25 * bf16_error
    assert (out - fp32).abs().mean() <= 1.5 * bf16_error


def test_streaming_result_uses_global_group_norm_statistics(model):
    """A tile-local GroupNorm would shift each tile by its own mean: a large DC offset makes that visible."""
    x = 0.5 + torch.rand(1, 1, 24, 20, 28, generator=torch.Generator().manual_seed(4)) * 1e-3
    x[..., :12, :, :] += 100.0
    with torch.no_grad():
        ref = model.encode(x)[0]
        out = model.encode(x, stream=StreamPlan(tile=4, scratch="memory"))[0]
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_file_store_keeps_data_after_pages_are_dropped(tmp_path):
    s = Store(3, (9, 5, 7), torch.float32, tmp_path)
    assert s.on_disk and os.listdir(tmp_path) == []
    a = torch.randn(1, 3, 4, 5, 7)
    b = torch.randn(1, 3, 5, 5, 7)
    s.write(((0, 4), (0, 5), (0, 7)), a)
    s.write(((4, 9), (0, 5), (0, 7)), b)
    got = s.read(((2, 7), (1, 4), (0, 7)), torch.device("cpu"))
    assert torch.equal(got, torch.cat([a, b], 2)[:, :, 2:7, 1:4])
    whole = torch.cat([a, b], 2)
    norm = torch.nn.GroupNorm(3, 3, eps=1e-6, affine=False)
    scale, shift = s.affine(norm)  # merged from the two tiles' moments
    assert torch.allclose(whole * scale + shift, norm(whole), atol=1e-5)
    s.close()


def test_planner_prefers_unsplit_then_split_then_streaming(model):
    shape = (1, 4, 10, 14, 18)
    one = estimate_peak(model, "decode", shape, 1) / GB
    assert plan_memory(model, "decode", shape, one * 1.01).kind == "unsplit"
    many = estimate_peak(model, "decode", shape, 40) / GB
    split = plan_memory(model, "decode", shape, (many + one) / 2)
    assert split.kind == "split" and split.num_splits > 1
    floor = min(estimate_peak(model, "decode", shape, k) for k in range(1, 41)) / GB
    streaming = plan_memory(model, "decode", shape, floor * 0.9)
    assert streaming.kind == "streaming" and streaming.estimated_gb <= floor * 0.9
    assert "streaming" in streaming.describe() and "estimated peak" in streaming.describe()
    z = torch.randn(1, 4, 10, 14, 18, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model.decode(z)
        out = model.decode_within(z, floor * 0.9)  # runs the streaming plan
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_planner_names_the_smallest_budget_that_fits(model):
    shape = (1, 4, 10, 14, 18)
    with pytest.raises(ValueError, match=r"needs at least ([0-9.]+) GB") as e:
        plan_memory(model, "decode", shape, 1e-6)
    need = float(e.value.args[0].split("needs at least ")[1].split(" GB")[0])
    assert plan_memory(model, "decode", shape, need + 0.01).kind == "streaming"
    with pytest.raises(ValueError, match="memory_gb must be positive"):
        plan_memory(model, "decode", shape, 0)


def test_streaming_estimate_stays_flat_while_the_in_memory_one_grows():
    """Released architecture: the in-memory estimate grows with the volume, streaming's working set does not."""
    big = Autoencoder(AutoencoderConfig())
    small, large = (1, 4, 64, 64, 64), (1, 4, 128, 128, 192)
    plan = StreamPlan(tile_bytes=256 * 1024**2, resident_bytes=0)
    s_small, s_large = estimate_streaming(big, "decode", small, plan), estimate_streaming(big, "decode", large, plan)
    m_small, m_large = estimate_peak(big, "decode", small, 64), estimate_peak(big, "decode", large, 128)
    assert m_large / m_small > 5
    # only the 1-channel result grows: 512x512x768 fp32 is 0.8 GB (+ its copies)
    assert s_large - s_small < 4 * 4 * (512 * 512 * 768 - 256**3) * 1.1
    assert s_large < 8 * GB


def test_file_store_pages_do_not_pile_up_in_the_resident_set(tmp_path):
    """A 400 MB map written and read back tile by tile raises the process's peak RSS by far less than 400 MB."""
    code = f"""
import resource, torch
from maisi.networks.stream import Store
s = Store(64, (128, 128, 96), torch.float32, {str(tmp_path)!r})
tile = torch.ones(1, 64, 8, 128, 96)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for a in range(0, 128, 8):
    s.write(((a, a + 8), (0, 128), (0, 96)), tile * a)
total = 0.0
for a in range(0, 128, 8):
    total += float(s.read(((a, a + 8), (0, 128), (0, 96)), torch.device("cpu"))[0, 0, 0, 0, 0])
assert total == sum(range(0, 128, 8)) * 8 / 8, total
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.strip()) < 150  # MB; the map itself is 400 MB
