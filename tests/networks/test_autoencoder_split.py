"""Tensor splitting is exact: any axis, any number of splits, odd lengths, several devices, 2D and 3D."""

import pytest
import torch

from maisi.config import AutoencoderConfig
from maisi.networks.autoencoder import Autoencoder


def _model(sd=3):
    torch.manual_seed(1)
    m = Autoencoder(AutoencoderConfig(spatial_dims=sd, channels=(4, 8, 8), num_res_blocks=(1, 1, 1), norm_num_groups=2))
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def ref(model):
    torch.manual_seed(2)
    x, z = torch.rand(1, 1, 12, 20, 28), torch.randn(1, 4, 3, 5, 7)
    with torch.no_grad():
        # the reference is unsplit and contiguous; the default on a CPU is channels_last_3d, so the tests below
        # compare both layouts as well as the splits
        return x, z, model.encode(x, num_splits=1, channels_last=False), model.decode(z, num_splits=1, channels_last=False)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("num_splits", [2, 3, 4, 5, 6, 7, 8])
def test_split_equals_unsplit(model, ref, axis, num_splits):
    x, z, (mu, sigma), img = ref
    with torch.no_grad():
        mu2, sigma2 = model.encode(x, num_splits=num_splits, split_axis=axis)
        img2 = model.decode(z, num_splits=num_splits, split_axis=axis)
    assert (mu - mu2).abs().max() <= 1e-4 and (sigma - sigma2).abs().max() <= 1e-4
    assert img2.shape == (1, 1, 12, 20, 28) and (img - img2).abs().max() <= 1e-4


def test_more_splits_than_rows_and_segments_shorter_than_halo(model, ref):
    """MONAI drops voxels when the length is not divisible and crashes on chunks shorter than the halo."""
    x, z, (mu, _), img = ref
    with torch.no_grad():
        assert (model.encode(x, num_splits=40, split_axis=0)[0] - mu).abs().max() <= 1e-4
        assert (model.decode(z, num_splits=40, split_axis=0) - img).abs().max() <= 1e-4


def test_round_robin_devices_and_batch(model):
    torch.manual_seed(3)
    z = torch.randn(2, 4, 2, 3, 5)
    with torch.no_grad():
        a = model.decode(z, num_splits=1)
        b = model.decode(z, num_splits=3, split_axis=2, devices=["cpu", "cpu"])
    assert (a - b).abs().max() <= 1e-4


def test_2d_split_matches_plain_autograd_path():
    m = _model(sd=2)
    x = torch.rand(1, 1, 20, 12)
    mu, _ = m.encode(x)  # grad enabled: plain path
    with torch.no_grad():
        mu2, _ = m.encode(x, num_splits=4, split_axis=1)
        img, img2 = m.decode(mu), m.decode(mu, num_splits=3, split_axis=0)
    assert (mu - mu2).abs().max() <= 1e-4 and (img - img2).abs().max() <= 1e-4


def test_bfloat16_close_to_fp32(model, ref):
    x, z, (mu, _), img = ref
    with torch.no_grad():
        img_bf = model.decode(z, num_splits=3, dtype=torch.bfloat16)
    assert img_bf.dtype == torch.float32
    rel = (img_bf - img).abs().max() / img.abs().max()
    assert 0 < rel < 0.05


@pytest.mark.parametrize("num_splits", [1, 3])
def test_group_norm_statistics_survive_a_large_mean(num_splits):
    """Regression: E[x²]-E[x]² in fp32 cancels when |mean| >> std; the merged Welford stats must not."""
    from torch import nn

    from maisi.networks.split import Plan, norm_affine

    torch.manual_seed(5)
    x = 1000 + 0.01 * torch.randn(2, 4, 5, 6, 7)
    norm = nn.GroupNorm(2, 4, eps=1e-6)
    scale, shift = norm_affine(norm, x, Plan(num_splits=num_splits, axis=1))
    ref = nn.functional.group_norm(x.double(), 2, eps=1e-6)
    assert ((x.double() * scale.double() + shift.double()) - ref).abs().max() < 1e-2


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "narrowed", "bf16"])
def test_channel_moments_match_fp64_across_chunks_and_layouts(layout, monkeypatch):
    """The shifted chunked sums give each channel's mean and M2 as fp64 does, whatever the memory layout, with
    chunks that do not divide the tensor and a mean far from 0 (the shift keeps the squares from cancelling), and
    of a bf16 map's values."""
    from maisi.networks import split

    monkeypatch.setattr(split, "_CHUNK", 7 * 13)  # chunks of a few rows, not dividing the 11 rows
    torch.manual_seed(6)
    x = 300 + 2 * torch.randn(2, 6, 11, 13, 9) + torch.arange(6.0).view(1, 6, 1, 1, 1)
    if layout != "contiguous":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "narrowed":
        x = x.narrow(3, 2, 8)  # a split segment: a view that is neither layout's contiguous block
    if layout == "bf16":
        x = x.bfloat16()  # cast a chunk at a time; the statistics are those of the bf16 values
    cnt, mean, m2 = split.channel_moments(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(2, 3, 4), correction=0)
    assert cnt == x[0, 0].numel()
    assert (mean - mean_ref).abs().max() < 1e-5
    assert ((m2 / cnt - var_ref) / var_ref).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_segments_across_cpu_and_cuda(model, ref, monkeypatch):
    x, z, (mu, _), img = ref
    # TF32 convolutions (on by default for cuDNN) round to 10-bit mantissas: compare in true fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    with torch.no_grad():
        img2 = model.decode(z, num_splits=4, devices=["cuda", "cpu"])
        mu2, _ = model.to("cuda").encode(x.cuda(), num_splits=3, split_axis=2)
        img_half = model.decode(z.cuda(), num_splits=2, dtype=torch.float16)
        model.to("cpu")
    assert img2.device.type == "cpu" and (img2 - img).abs().max() <= 1e-4
    assert (mu2.cpu() - mu).abs().max() <= 1e-4
    assert (img_half.cpu() - img).abs().max() / img.abs().max() < 0.05


def test_channels_last_split_equals_unsplit(model, ref):
    x, z, (mu, _), img = ref
    with torch.no_grad():
        assert (model.encode(x, num_splits=3, channels_last=True)[0] - mu).abs().max() <= 1e-4
        assert (model.decode(z, num_splits=5, split_axis=1, channels_last=True) - img).abs().max() <= 1e-4


def test_cpu_default_layout_is_channels_last_in_fp32_and_bf16(model):
    cpu = torch.device("cpu")
    assert model._plan(None, None, None, None, None, cpu).channels_last
    assert model._plan(None, None, None, torch.bfloat16, None, cpu).channels_last
    assert not model._plan(None, None, None, None, False, cpu).channels_last
    assert not model._plan(None, None, ["cpu", "cpu"], None, None, cpu).channels_last  # device lists: contiguous
    assert not model._plan(None, None, None, None, None, torch.device("cuda")).channels_last  # GPU fp32
