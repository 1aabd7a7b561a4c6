"""The diffusion UNet and ControlNet against MONAI's reference networks: strict state-dict load, equal outputs."""

import einops  # noqa: F401  MONAI's attention blocks need it; a test dependency (pyproject [test])
import pytest
import torch
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

from maisi.config import ControlNetConfig, UNetConfig, preset
from maisi.io.checkpoint import load_state_dict_strict
from maisi.networks.controlnet import ControlNet, mask_to_bit_planes
from maisi.networks.unet import DiffusionUNet


def small(flavour: str, spatial_dims: int = 3) -> UNetConfig:
    v2 = flavour == "rflow"
    return UNetConfig(spatial_dims=spatial_dims, channels=(8, 16, 16, 32), attention_levels=(False, False, True, True),
                      num_head_channels=(0, 0, 8, 8), num_res_blocks=2, norm_num_groups=8, resblock_updown=v2,
                      include_fc=v2, include_region_input=not v2, num_class_embeds=128 if v2 else None)


def monai_unet(cfg: UNetConfig) -> DiffusionModelUNetMaisi:
    return DiffusionModelUNetMaisi(
        spatial_dims=cfg.spatial_dims, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        num_channels=list(cfg.channels), attention_levels=list(cfg.attention_levels),
        num_head_channels=list(cfg.num_head_channels), num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps, resblock_updown=cfg.resblock_updown,
        include_fc=cfg.include_fc, num_class_embeds=cfg.num_class_embeds,
        include_top_region_index_input=cfg.include_region_input,
        include_bottom_region_index_input=cfg.include_region_input,
        include_spacing_input=cfg.include_spacing_input, use_flash_attention=False,
    )


def monai_controlnet(cfg: UNetConfig, c: ControlNetConfig) -> ControlNetMaisi:
    return ControlNetMaisi(
        spatial_dims=cfg.spatial_dims, in_channels=cfg.in_channels, num_channels=list(cfg.channels),
        attention_levels=list(cfg.attention_levels), num_head_channels=list(cfg.num_head_channels),
        num_res_blocks=cfg.num_res_blocks, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
        resblock_updown=cfg.resblock_updown, include_fc=cfg.include_fc, num_class_embeds=cfg.num_class_embeds,
        conditioning_embedding_in_channels=c.conditioning_in_channels,
        conditioning_embedding_num_channels=list(c.conditioning_channels), use_checkpointing=False,
        use_flash_attention=False,
    )


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random non-zero weights everywhere, the zero-initialised layers included (else the test is vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 10
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def conditions(flavour: str, n: int):
    g = torch.Generator().manual_seed(7)
    spacing = torch.rand(n, 3, generator=g) + 0.5
    if flavour == "rflow":
        return dict(spacing=spacing, modality=torch.tensor([1, 9][:n])), dict(
            spacing_tensor=spacing * 100, class_labels=torch.tensor([1, 9][:n]))
    top, bottom = torch.eye(4)[[1, 0][:n]], torch.eye(4)[[2, 3][:n]]
    return dict(spacing=spacing, top_region=top, bottom_region=bottom), dict(
        spacing_tensor=spacing * 100, top_region_index_tensor=top * 100, bottom_region_index_tensor=bottom * 100)


@pytest.mark.parametrize("flavour, shape", [("ddpm", (8, 16, 24)), ("rflow", (8, 8, 8)), ("rflow", (16, 8, 24))])
def test_unet_and_controlnet_equal_monai(flavour, shape):
    cfg, ccfg = small(flavour), ControlNetConfig()
    ref_unet, ref_cn = monai_unet(cfg).eval(), monai_controlnet(cfg, ccfg).eval()
    randomise(ref_unet, 0)
    randomise(ref_cn, 1)
    unet, cn = DiffusionUNet(cfg).eval(), ControlNet(cfg, ccfg).eval()
    load_state_dict_strict(unet, ref_unet.state_dict())
    load_state_dict_strict(cn, ref_cn.state_dict())
    n = 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, *shape, generator=g)
    t = torch.tensor([999.0, 17.5])
    mask = torch.randint(0, 256, (n, 1, *[4 * s for s in shape]), generator=g)
    ours_c, ref_c = conditions(flavour, n)
    with torch.no_grad():
        ref_down, ref_mid = ref_cn(x, t, mask_to_bit_planes(mask), class_labels=ref_c.get("class_labels"))
        ref_out = ref_unet(x, t, down_block_additional_residuals=[d.clone() for d in ref_down],
                           mid_block_additional_residual=ref_mid.clone(), **ref_c)
        down, mid = cn(x, t, mask, modality=ours_c.get("modality"))
        out = unet(x, t, down_residuals=down, mid_residual=mid, **ours_c)
    assert len(down) == len(ref_down) == 12
    for a, b in zip(down, ref_down):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mid, ref_mid, atol=1e-4, rtol=1e-4)
    assert ref_out.abs().max() > 1e-2  # a real comparison, not of zeros
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["ddpm-ct", "rflow-ct"])
def test_released_layouts_have_monai_keys_and_parameter_counts(name):
    cfg = preset(name).unet
    ours, ref = DiffusionUNet(cfg), monai_unet(cfg)
    a, b = ours.state_dict(), ref.state_dict()
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    n = sum(p.numel() for p in ours.parameters()) / 1e6
    assert n == pytest.approx({"ddpm-ct": 169.4, "rflow-ct": 180.5}[name], rel=0.01)
    cn, ref_cn = ControlNet(cfg), monai_controlnet(cfg, ControlNetConfig())
    assert {k: tuple(v.shape) for k, v in cn.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref_cn.state_dict().items()}
    assert sum(p.numel() for p in cn.parameters()) / 1e6 == pytest.approx(
        {"ddpm-ct": 68.6, "rflow-ct": 72.0}[name], rel=0.01)
