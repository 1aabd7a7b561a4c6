"""Inference speed options of the UNet and ControlNet: bf16 weights (fp32 GroupNorm) and channels_last_3d."""

import copy

import pytest
import torch

from maisi.config import ControlNetConfig, UNetConfig
from maisi.networks.controlnet import ControlNet
from maisi.networks.precision import for_inference
from maisi.networks.unet import DiffusionUNet

CFG = UNetConfig(channels=(8, 16, 16, 32), attention_levels=(False, False, True, True), num_head_channels=(0, 0, 8, 8),
                 num_res_blocks=1, norm_num_groups=8)


def nets(seed=0):
    """A tiny v2 UNet + ControlNet with random non-zero weights everywhere (zero-initialised layers included)."""
    unet, cn = DiffusionUNet(CFG).eval(), ControlNet(CFG, ControlNetConfig()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*unet.parameters(), *cn.parameters()]:
            fan_in = p[0].numel() if p.ndim > 1 else 10
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return unet, cn


def run(unet, cn, n=2, size=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, size, size, size, generator=g)
    mask = torch.randint(0, 256, (n, 1, 4 * size, 4 * size, 4 * size), generator=g)
    t, c = torch.tensor([900.0, 20.0][:n]), dict(spacing=torch.tensor([[1.0, 1.2, 2.5]] * n), modality=torch.tensor([1, 3][:n]))
    with torch.no_grad():
        down, mid = cn(x, t, mask, modality=c["modality"])
        return unet(x, t, down_residuals=down, mid_residual=mid, **c)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_inference_close_to_fp32_with_fp32_groupnorm(channels_last):
    unet, cn = nets()
    ref = run(unet, cn)
    keys = list(unet.state_dict())
    for m in (unet, cn):
        for_inference(m, torch.bfloat16, channels_last=channels_last)
    assert list(unet.state_dict()) == keys
    assert unet.down_blocks[0].resnets[0].norm1.weight.dtype == torch.float32
    assert unet.down_blocks[0].resnets[0].conv1.conv.weight.dtype == torch.bfloat16
    assert cn.controlnet_cond_embedding.conv_in.conv.weight.dtype == torch.bfloat16
    out = run(unet, cn)
    assert out.dtype == torch.float32 and out.is_contiguous()  # returned in the input's dtype and layout
    rel = float((out - ref).norm() / ref.norm())
    assert ref.abs().max() > 1e-1 and 1e-4 < rel < 0.1  # bf16 really ran, and stayed close (fp32: ~1e-6)


def test_channels_last_fp32_equals_contiguous():
    unet, cn = nets()
    ref = run(unet, cn)
    for m in (unet, cn):
        for_inference(m, torch.float32, channels_last=True)
    assert unet.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not unet.conv_in.conv.weight.is_contiguous()
    torch.testing.assert_close(run(unet, cn), ref, atol=1e-5, rtol=1e-5)


def test_fp32_controlnet_residuals_feed_a_bf16_unet():
    unet, cn = nets()
    ref = run(unet, cn)
    for_inference(unet, torch.bfloat16)
    out = run(unet, copy.deepcopy(cn))
    assert float((out - ref).norm() / ref.norm()) < 0.1


def test_for_inference_rejects_non_float_dtypes():
    with pytest.raises(ValueError, match="dtype must be one of"):
        for_inference(DiffusionUNet(CFG), torch.int8)
