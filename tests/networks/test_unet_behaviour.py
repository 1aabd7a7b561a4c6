"""UNet and ControlNet behaviour: identity of a fresh ControlNet, joint backprop, conditions, key upgrades."""

from dataclasses import replace

import pytest
import torch

from maisi.config import ControlNetConfig, UNetConfig, preset
from maisi.networks.controlnet import ControlNet, mask_to_bit_planes
from maisi.networks.unet import DiffusionUNet

V2 = UNetConfig(spatial_dims=2, channels=(8, 8, 16), attention_levels=(False, True, True),
                num_head_channels=(0, 8, 8), num_res_blocks=1, norm_num_groups=4)
V1 = UNetConfig(spatial_dims=2, channels=(8, 8, 16), attention_levels=(False, True, True),
                num_head_channels=(0, 8, 8), num_res_blocks=1, norm_num_groups=4, resblock_updown=False,
                include_fc=False, include_region_input=True, num_class_embeds=None)
CN = ControlNetConfig()


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised output layers
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def v2_inputs(n=2):
    return torch.randn(n, 4, 8, 12), torch.tensor([500.0, 3.0][:n]), dict(
        spacing=torch.tensor([[1.5, 1.5, 2.0]] * n), modality=torch.ones(n, dtype=torch.long))


def test_fresh_controlnet_leaves_unet_output_unchanged():
    torch.manual_seed(0)
    unet = DiffusionUNet(V2).eval()
    _perturb(unet)
    cn = ControlNet.from_unet(unet, CN).eval()
    x, t, c = v2_inputs()
    mask = torch.randint(0, 200, (2, 1, 32, 48))
    with torch.no_grad():
        down, mid = cn(x, t, mask, modality=c["modality"])
        assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) == 0
        assert torch.equal(unet(x, t, **c), unet(x, t, **c, down_residuals=down, mid_residual=mid))
    assert "conv_in.conv.weight" in cn.copied_from_unet and "down_blocks.0.resnets.0.conv1.conv.weight" in cn.copied_from_unet
    assert torch.equal(cn.conv_in.conv.weight, unet.conv_in.conv.weight)


def test_unet_and_controlnet_train_together():
    torch.manual_seed(1)
    unet = DiffusionUNet(V2)
    _perturb(unet)
    cn = ControlNet.from_unet(unet, CN)
    _perturb(cn)
    x, t, c = v2_inputs()
    down, mid = cn(x, t, torch.randint(0, 9, (2, 1, 32, 48)), modality=c["modality"])
    unet(x, t, **c, down_residuals=down, mid_residual=mid).square().mean().backward()
    assert unet.conv_in.conv.weight.grad is not None and unet.conv_in.conv.weight.grad.abs().sum() > 0
    assert cn.controlnet_cond_embedding.conv_in.conv.weight.grad.abs().sum() > 0
    assert cn.controlnet_mid_block.conv.weight.grad.abs().sum() > 0


def test_v1_conditions_and_errors():
    unet = DiffusionUNet(V1).eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10.0])
    ok = dict(spacing=torch.tensor([[1.0, 1.0, 1.0]]), top_region=torch.eye(4)[1:2], bottom_region=torch.eye(4)[2:3])
    assert unet(x, t, **ok).shape == x.shape
    with pytest.raises(ValueError, match="conditioned on top_region"):
        unet(x, t, spacing=ok["spacing"])
    with pytest.raises(ValueError, match="no modality input"):
        unet(x, t, **ok, modality=torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible by 4"):
        unet(torch.randn(1, 4, 8, 6), t, **ok)
    with pytest.raises(ValueError, match="N×4×S×S"):
        unet(torch.randn(1, 3, 8, 8), t, **ok)
    with pytest.raises(ValueError, match="one timestep per sample"):
        unet(x, torch.tensor([1.0, 2.0]), **ok)
    v2 = DiffusionUNet(V2)
    x2, t2, c2 = v2_inputs(1)
    with pytest.raises(ValueError, match="conditioned on modality"):
        v2(x2, t2, spacing=c2["spacing"])
    with pytest.raises(ValueError, match="modality codes must be in 0..127"):
        v2(x2, t2, spacing=c2["spacing"], modality=torch.tensor([300]))
    with pytest.raises(ValueError, match="no top_region input"):
        v2(x2, t2, **c2, top_region=torch.eye(4)[:1])


def test_spacing_and_modality_change_the_output():
    torch.manual_seed(2)
    unet = DiffusionUNet(V2).eval()
    _perturb(unet)
    x, t, c = v2_inputs(1)
    with torch.no_grad():
        base = unet(x, t, **c)
        assert not torch.allclose(base, unet(x, t, spacing=c["spacing"] * 2, modality=c["modality"]))
        assert not torch.allclose(base, unet(x, t, spacing=c["spacing"], modality=torch.tensor([0])))


def test_context_embedding_adds_the_context_to_the_time_embedding():
    cfg = UNetConfig(spatial_dims=2, channels=(8, 8), attention_levels=(False, False), num_head_channels=(0, 8),
                     num_res_blocks=1, norm_num_groups=4, include_spacing_input=False, num_class_embeds=None,
                     cross_attention_dim=10, context_embedding=True)
    torch.manual_seed(0)
    unet = DiffusionUNet(cfg).eval()
    _perturb(unet)
    assert {k for k in unet.state_dict() if k.startswith("context_embed.")} == {
        "context_embed.0.weight", "context_embed.0.bias", "context_embed.2.weight", "context_embed.2.bias"}
    plain = DiffusionUNet(replace(cfg, context_embedding=False)).eval()
    assert not any(k.startswith("context_embed") for k in plain.state_dict())  # released layouts are untouched
    plain.load_state_dict({k: v for k, v in unet.state_dict().items() if not k.startswith("context_embed")})
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.full((1, 1, 10), 0.3)
    with torch.no_grad():
        with_path = unet(x, t, context=ctx)
        assert (with_path - plain(x, t, context=ctx)).abs().max() > 1e-3
        unet.context_embed[2].weight.zero_()
        unet.context_embed[2].bias.zero_()  # an embedding of 0 is the plain network
        torch.testing.assert_close(unet(x, t, context=ctx), plain(x, t, context=ctx))
    with pytest.raises(ValueError, match="context_embedding needs a context"):
        replace(cfg, cross_attention_dim=None)


def test_mask_encoding_and_controlnet_input_checks():
    mask = torch.tensor([0, 1, 6, 200, 255]).view(1, 1, 5)
    planes = mask_to_bit_planes(mask)
    assert planes.shape == (1, 8, 5)
    assert planes[0, :, 3].tolist() == [0, 0, 0, 1, 0, 0, 1, 1]  # 200 = 0b11001000, bit k in plane k
    assert torch.equal((planes * (2 ** torch.arange(8)).view(1, 8, 1)).sum(1).long(), mask[:, 0])
    with pytest.raises(ValueError, match="0..255"):
        mask_to_bit_planes(torch.tensor([[[256]]]))
    cn = ControlNet(V2, CN)
    x, t, c = v2_inputs(1)
    with pytest.raises(ValueError, match="image resolution"):
        cn(x, t, torch.zeros(1, 1, 8, 12, dtype=torch.long), modality=c["modality"])


def test_historical_keys_are_upgraded_explicitly():
    v2 = DiffusionUNet(V2)
    state = v2.state_dict()
    old = {}
    for k, v in state.items():
        k = k.replace(".attn.to_q.", ".to_q.").replace(".attn.out_proj.", ".proj_attn.")
        old[k] = v
    new, notes = v2.upgrade_state_dict(old)
    assert set(new) == set(state) and any("renamed" in n for n in notes)
    v1 = DiffusionUNet(V1)
    leftovers = dict(v1.state_dict())
    leftovers["down_blocks.1.attentions.0.attn.proj_attn.weight"] = torch.zeros(8, 8)
    new, notes = v1.upgrade_state_dict(leftovers)
    assert set(new) == set(v1.state_dict()) and notes and "dropped unused key" in notes[0]


def test_tiny_preset_runs_in_3d():
    cfg = preset("tiny")
    unet = DiffusionUNet(cfg.unet)
    x = torch.randn(1, 4, 8, 8, 8)
    out = unet(x, torch.tensor([100.0]), spacing=torch.tensor([[1.5, 1.5, 1.5]]), modality=torch.tensor([1]))
    assert out.shape == x.shape


def test_small_3d_inference_convs_go_to_onednn_with_equal_results(monkeypatch):
    from maisi.networks import unet_blocks

    conv = unet_blocks.Conv(3, 16, 24)
    x = torch.randn(1, 16, 8, 8, 8)  # N·C·D·H = 1024 ≤ 20480: PyTorch itself would pick its im2col kernel
    with torch.no_grad():
        expected = conv.conv(x)
    calls = []
    real = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = conv(x)
        conv(torch.randn(1, 16, 4, 4, 4))  # 4³: the im2col kernel is as fast; left to PyTorch
    assert calls == [1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    y = conv(x.requires_grad_())  # autograd: PyTorch's own path, gradients intact
    y.sum().backward()
    assert calls == [1] and x.grad is not None
