"""Our Autoencoder loads MONAI AutoencoderKlMaisi state dicts strictly and gives the same outputs."""

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from maisi.config import AutoencoderConfig
from maisi.networks.autoencoder import Autoencoder


def _monai(channels, groups, res=(2, 2, 2), split=1):
    return AutoencoderKlMaisi(
        spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=list(channels),
        num_res_blocks=list(res), norm_num_groups=groups, norm_eps=1e-6, attention_levels=[False] * len(channels),
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, num_splits=split, dim_split=1,
        norm_float16=False, save_mem=False,
    )


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = _monai((8, 16, 32), 4).eval()
    for p in ref.parameters():  # non-trivial weights so every layer matters
        p.data.normal_(0, 0.2)
    ours = Autoencoder(AutoencoderConfig(channels=(8, 16, 32), norm_num_groups=4)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_released_layout_keys_and_shapes_match():
    ref = _monai((64, 128, 256), 32, split=8).state_dict()
    ours = Autoencoder(AutoencoderConfig()).state_dict()
    assert len(ours) == 130
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert "encoder.blocks.3.conv.conv.conv.weight" in ours and "decoder.blocks.4.nin_shortcut.conv.conv.weight" in ours


@pytest.mark.parametrize("num_splits,axis", [(1, 0), (3, 1), (5, 2)])
def test_encode_decode_match_monai(pair, num_splits, axis):
    ref, ours = pair
    x = torch.rand(1, 1, 20, 24, 28)
    with torch.no_grad():
        mu, sigma = ref.encode(x)
        mu2, sigma2 = ours.encode(x, num_splits=num_splits, split_axis=axis)
        assert mu2.shape == (1, 4, 5, 6, 7)
        assert (mu - mu2).abs().max() <= 1e-4 and (sigma - sigma2).abs().max() <= 1e-4
        z = mu + 0.5 * torch.randn_like(mu)
        img, img2 = ref.decode(z), ours.decode(z, num_splits=num_splits, split_axis=axis)
    assert img2.shape == img.shape == (1, 1, 20, 24, 28)
    assert (img - img2).abs().max() <= 1e-4


def test_training_path_matches_monai_and_backprops(pair):
    ref, ours = pair
    x = torch.rand(1, 1, 12, 8, 16)
    with torch.no_grad():
        mu, _ = ref.encode(x)
    mu2, sigma2 = ours.encode(x)  # gradients enabled: plain autograd path
    assert (mu - mu2).abs().max() <= 1e-4
    (ours.decode(mu2).square().mean() + sigma2.mean()).backward()
    grads = [p.grad for p in ours.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    ours.zero_grad(set_to_none=True)
