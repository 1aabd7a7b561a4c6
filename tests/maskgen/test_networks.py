"""The mask autoencoder and mask UNet against MONAI's classes (strict state-dict load, equal outputs), and
loading of NVIDIA's released file layout."""

import dataclasses

import einops  # noqa: F401  MONAI's attention blocks need it
import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.networks.nets import DiffusionModelUNet

from maisi.config import AutoencoderConfig, UNetConfig, preset, to_dict
from maisi.io.checkpoint import CheckpointError
from maisi.maskgen import (
    MaskGenConfig,
    build_mask_autoencoder,
    build_mask_unet,
    load_mask_autoencoder,
    load_mask_unet,
    mask_preset,
)
from maisi.networks.stream import StreamPlan

TINY = mask_preset("mask-tiny")
# the released structure (res blocks [1, 2, 2], transposed conv, 8 → 125) at test width
SMALL_AE = dataclasses.replace(mask_preset("mask-ct").autoencoder, channels=(8, 16, 16), norm_num_groups=4, num_splits=1)
SMALL_UNET = dataclasses.replace(mask_preset("mask-ct").unet, channels=(16, 16, 32, 32), num_head_channels=(0, 0, 16, 16),
                                 norm_num_groups=8)


def monai_autoencoder(c: AutoencoderConfig) -> AutoencoderKlMaisi:
    return AutoencoderKlMaisi(
        spatial_dims=3, in_channels=c.in_channels, out_channels=c.out_channels, latent_channels=c.latent_channels,
        num_channels=list(c.channels), num_res_blocks=list(c.num_res_blocks), norm_num_groups=c.norm_num_groups,
        norm_eps=c.norm_eps, attention_levels=[False] * len(c.channels), with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False, use_convtranspose=c.upsample_mode == "transposed_conv", num_splits=1,
        dim_split=1, norm_float16=False, save_mem=False,
    )


def monai_unet(c: UNetConfig) -> DiffusionModelUNet:
    return DiffusionModelUNet(
        spatial_dims=3, in_channels=c.in_channels, out_channels=c.out_channels, channels=list(c.channels),
        attention_levels=list(c.attention_levels), num_head_channels=list(c.num_head_channels),
        num_res_blocks=c.num_res_blocks, norm_num_groups=c.norm_num_groups, norm_eps=c.norm_eps,
        resblock_updown=c.resblock_updown, include_fc=c.include_fc, with_conditioning=True,
        cross_attention_dim=c.cross_attention_dim, upcast_attention=c.upcast_attention,
    )


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random non-zero weights everywhere, the zero-initialised layers included (else the test is vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 10
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def autoencoders(one_thread):
    ref = monai_autoencoder(SMALL_AE).eval()
    randomise(ref, 0)
    ours = build_mask_autoencoder(dataclasses.replace(TINY, autoencoder=SMALL_AE)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def unets(one_thread):
    ref = monai_unet(SMALL_UNET).eval()
    randomise(ref, 1)
    ours = build_mask_unet(dataclasses.replace(TINY, unet=SMALL_UNET)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_released_layouts_have_monai_keys_shapes_and_sizes():
    cfg = mask_preset("mask-ct")
    with torch.device("meta"):
        pairs = [(build_mask_autoencoder(cfg), monai_autoencoder(cfg.autoencoder), 5.26),
                 (build_mask_unet(cfg), monai_unet(cfg.unet), 197.2)]
    for ours, ref, millions in pairs:
        assert shapes(ours) == shapes(ref)
        assert sum(p.numel() for p in ours.parameters()) / 1e6 == pytest.approx(millions, rel=0.005)
    assert "decoder.blocks.3.conv.conv.conv.weight" in shapes(pairs[0][0])  # the transposed conv, MONAI's nesting
    assert cfg.output_shape == (256, 256, 256)


@pytest.mark.parametrize("num_splits,axis", [(1, 0), (3, 1), (4, 2)])
def test_mask_autoencoder_equals_monai(autoencoders, num_splits, axis):
    ref, ours = autoencoders
    x = (torch.rand(1, 8, 16, 12, 20) > 0.5).float()
    with torch.no_grad():
        mu, sigma = ref.encode(x)
        mu2, sigma2 = ours.encode(x, num_splits=num_splits, split_axis=axis)
        logits = ref.decode(mu)
        logits2 = ours.decode(mu, num_splits=num_splits, split_axis=axis)
    assert logits2.shape == logits.shape == (1, 125, 16, 12, 20)
    assert (mu - mu2).abs().max() <= 1e-4 and (sigma - sigma2).abs().max() <= 1e-4
    assert (logits - logits2).abs().max() <= 1e-4
    assert logits.abs().max() > 1e-1  # a real comparison


def test_mask_autoencoder_streaming_and_training_paths_equal_monai(autoencoders):
    ref, ours = autoencoders
    z = torch.randn(1, 4, 3, 4, 5)
    with torch.no_grad():
        logits = ref.decode(z)
        streamed = ours.decode(z, stream=StreamPlan(tile=3, scratch="memory"))
    assert (logits - streamed).abs().max() <= 1e-4
    trained = ours.decode(z.requires_grad_())  # gradients on: the plain autograd path
    assert (logits - trained.detach()).abs().max() <= 1e-4
    trained.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_mask_unet_equals_monai(unets):
    ref, ours = unets
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, 8, generator=g), torch.tensor([3.0, 731.0])
    context = torch.rand(2, 1, 10, generator=g)
    with torch.no_grad():
        expected, got = ref(x, t, context=context), ours(x, t, context=context)
        other = ours(x, t, context=context.flip(0))
    assert got.shape == (2, 4, 8, 8, 8)
    assert (expected - got).abs().max() <= 1e-4
    assert expected.abs().max() > 1e-2 and (other - got).abs().max() > 1e-3  # the context matters


def test_mask_unet_refuses_a_missing_or_misshapen_context(unets):
    _, ours = unets
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([1.0])
    with pytest.raises(ValueError, match="conditioned on a context"):
        ours(x, t)
    with pytest.raises(ValueError, match="N×L×10"):
        ours(x, t, context=torch.zeros(1, 10))


def test_released_file_layout_loads(tmp_path, autoencoders, unets):
    ae_ref, ae_ours = autoencoders
    unet_ref, unet_ours = unets
    cfg = dataclasses.replace(TINY, autoencoder=SMALL_AE, unet=SMALL_UNET)
    torch.save(ae_ref.state_dict(), tmp_path / "mask_generation_autoencoder.pt")  # a raw state dict
    torch.save({"unet_state_dict": unet_ref.state_dict(), "scale_factor": torch.tensor(1.0056), "epoch": 3,
                "loss": torch.tensor(0.1)}, tmp_path / "mask_generation_diffusion_unet.pt")
    ae = load_mask_autoencoder(tmp_path / "mask_generation_autoencoder.pt", cfg)
    unet, scale = load_mask_unet(tmp_path / "mask_generation_diffusion_unet.pt", cfg)
    assert scale == pytest.approx(1.0056) and not unet.training
    for name, tensor in unet_ours.state_dict().items():
        assert torch.equal(unet.state_dict()[name], tensor), name
    for name, tensor in ae_ours.state_dict().items():
        assert torch.equal(ae.state_dict()[name], tensor), name


def test_monai_generative_key_names_are_renamed(tmp_path, unets):
    _, ours = unets
    old = {k.replace(".out_proj.", ".to_out.0.") if "transformer_blocks" in k else
           k.replace(".upsampler.postconv.", ".upsampler.conv."): v for k, v in ours.state_dict().items()}
    assert any(".to_out.0." in k for k in old) and any(".upsampler.conv.conv." in k for k in old)
    torch.save({"unet_state_dict": old, "scale_factor": 1.0}, tmp_path / "old.pt")
    cfg = dataclasses.replace(TINY, unet=SMALL_UNET)
    with pytest.warns(UserWarning, match="renamed"):
        unet, _ = load_mask_unet(tmp_path / "old.pt", cfg)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_a_file_of_other_networks_is_refused_naming_the_keys(tmp_path):
    torch.save(build_mask_autoencoder(TINY).state_dict(), tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_mask_autoencoder(tmp_path / "ae.pt", dataclasses.replace(TINY, autoencoder=SMALL_AE))


def test_new_config_fields_keep_the_image_networks_unchanged():
    for name in ("ddpm-ct", "rflow-ct"):
        cfg = preset(name)
        assert cfg.autoencoder.upsample_mode == "trilinear" and cfg.unet.cross_attention_dim is None
        assert "upsample_mode" in to_dict(cfg.autoencoder)


@pytest.mark.parametrize("change,message", [
    (dict(latent_shape=(4, 12, 16, 16)), "multiple of 8"),
    (dict(latent_shape=(3, 16, 16, 16)), "must be equal"),
    (dict(scale_factor=0.0), "scale_factor"),
    (dict(autoencoder=AutoencoderConfig()), "in_channels must be 8"),
    (dict(unet=dataclasses.replace(TINY.unet, cross_attention_dim=None, context_embedding=False)), "cross_attention_dim must be 10"),
])
def test_impossible_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        MaskGenConfig(**{**{f.name: getattr(TINY, f.name) for f in dataclasses.fields(TINY)}, **change})
