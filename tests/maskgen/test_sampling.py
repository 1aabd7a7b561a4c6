"""Label maps in and out of the mask autoencoder, and the sampler on the tiny preset."""

import dataclasses

import numpy as np
import pytest
import torch

from maisi.diffusion.sampling import make_generators, make_noise, sample
from maisi.diffusion.schedulers import make_scheduler
from maisi.maskgen import (
    build_mask_autoencoder,
    build_mask_unet,
    decode_logits,
    decode_mask,
    encode_label_map,
    generate_mask,
    mask_preset,
    sample_mask_latent,
)
from maisi.maskgen.encoding import index_to_label, to_class_index

TINY = mask_preset("mask-tiny")
SMALL = dataclasses.replace(TINY, latent_shape=(4, 8, 8, 8))  # rectified flow, as mask-tiny
EPSILON = dataclasses.replace(SMALL, scheduler=mask_preset("mask-ct").scheduler)  # noise prediction, as released


@pytest.fixture(scope="module")
def networks(one_thread):
    """Tiny networks whose zero-initialised layers are redrawn, so the context and noise reach the output."""
    torch.manual_seed(0)
    ae, unet = build_mask_autoencoder(SMALL).eval(), build_mask_unet(SMALL).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return ae, unet


def test_the_remap_table_is_the_released_one():
    table = index_to_label()
    assert table.shape == (125,) and table[0] == 0 and table[1] == 1
    assert (table[122], table[123], table[124]) == (129, 132, 200)


def test_label_maps_become_bit_planes_of_class_indices():
    labels = torch.tensor([0, 1, 3, 132, 200, 129]).view(1, 1, 6, 1, 1)
    planes = encode_label_map(labels)
    assert planes.shape == (1, 8, 6, 1, 1) and planes.dtype == torch.float32
    index = (planes * (2 ** torch.arange(8)).view(1, 8, 1, 1, 1)).sum(1).long().flatten()
    assert index.tolist() == [0, 1, 2, 123, 124, 122]  # spleen (3) is class 2, body class 124
    assert torch.equal(to_class_index(np.array([[3]])), torch.tensor([[2]]))


def test_ids_outside_the_mask_vocabulary_are_refused():
    with pytest.raises(ValueError, match=r"ids \[2\] are not in the mask model's vocabulary"):
        encode_label_map(torch.tensor([2]).view(1, 1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"ids must be in 0..255"):
        encode_label_map(torch.tensor([300]).view(1, 1, 1, 1, 1))


def test_logits_are_argmaxed_and_remapped():
    logits = torch.zeros(1, 125, 4, 1, 1)
    for voxel, index in enumerate([0, 2, 122, 124]):
        logits[0, index, voxel] = 5.0
    labels = decode_logits(logits)
    assert labels.dtype == torch.uint8 and labels.flatten().tolist() == [0, 3, 129, 200]
    with pytest.raises(ValueError, match="N×125×spatial"):
        decode_logits(torch.zeros(1, 124, 2, 2, 2))


def test_decoding_divides_the_latent_by_the_scale_factor(networks):
    ae, _ = networks
    z = torch.randn(1, 4, 4, 4, 4)
    with torch.no_grad():
        expected = decode_logits(ae.decode(z / 2.5))
    assert torch.equal(decode_mask(ae, z, 2.5), expected)
    assert torch.equal(decode_mask(ae, z, 2.5, memory_gb=4.0), expected)  # the plan the budget picks
    assert not torch.equal(decode_mask(ae, z, 1.0), expected)


@pytest.mark.parametrize("config,sampler,steps", [(EPSILON, "ddpm", 20), (EPSILON, "ddim", 5), (SMALL, "rflow", 4)])
def test_the_sampler_is_seeded_and_conditioned(networks, config, sampler, steps):
    ae, unet = networks
    context = [0.2, 0.7, 0.3, 0.5, 0.6, -1, -1, 0.4, -1, -1]
    a = sample_mask_latent(unet, context, config, seed=1, sampler=sampler, steps=steps)
    b = sample_mask_latent(unet, context, config, seed=1, sampler=sampler, steps=steps)
    other_seed = sample_mask_latent(unet, context, config, seed=2, sampler=sampler, steps=steps)
    other_context = sample_mask_latent(unet, [0.9] * 5 + [-1] * 5, config, seed=1, sampler=sampler, steps=steps)
    assert a.shape == (1, 4, 8, 8, 8) and torch.equal(a, b)
    assert (a - other_seed).abs().max() > 1e-2 and (a - other_context).abs().max() > 1e-4
    labels = generate_mask(ae, unet, context, config, seed=1, sampler=sampler, steps=steps)
    assert labels.shape == (1, 1, 32, 32, 32) and labels.dtype == torch.uint8
    assert set(labels.unique().tolist()) <= set(index_to_label().tolist())


def test_guidance_pushes_the_conditional_prediction_away_from_the_dont_care_one(networks):
    _, unet = networks
    context = [0.2, 0.7, 0.3, 0.5, 0.6, -1, -1, 0.4, -1, -1]
    ctx, null = torch.tensor(context).view(1, 1, 10), torch.full((1, 1, 10), -1.0)
    plain = sample_mask_latent(unet, context, SMALL, seed=1, steps=4)
    assert torch.equal(sample_mask_latent(unet, context, SMALL, seed=1, steps=4, guidance=0.0), plain)
    batches = []
    hook = unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    guided = sample_mask_latent(unet, context, SMALL, seed=1, steps=4, guidance=3.0)
    hook.remove()
    assert batches == [2] * 4  # both branches in one forward a step

    def by_hand(x, t):
        u = unet(x, t, context=null)
        return u + 3.0 * (unet(x, t, context=ctx) - u)

    scheduler = make_scheduler(dataclasses.replace(SMALL.scheduler, num_inference_steps=4), 3)
    gens = make_generators([1])
    expected = sample(by_hand, scheduler, make_noise(SMALL.latent_shape, [1], generators=gens), generator=gens)
    torch.testing.assert_close(guided, expected, rtol=0, atol=1e-5)
    assert (guided - plain).abs().max() > 1e-3
    # the scale a model ships with is its default
    shipped = dataclasses.replace(SMALL, guidance_scale=3.0)
    assert torch.equal(sample_mask_latent(unet, context, shipped, seed=1, steps=4), guided)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        dataclasses.replace(SMALL, guidance_scale=-1.0)


def test_the_released_sampler_is_ddpm_with_1000_steps():
    cfg = mask_preset("mask-ct")
    assert (cfg.scheduler.kind, cfg.scheduler.num_inference_steps) == ("ddpm", 1000)
    assert cfg.latent_shape == (4, 64, 64, 64) and cfg.scale_factor == pytest.approx(1.0056, abs=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(config=EPSILON, sampler="rflow"), "sampler must be 'ddpm' or 'ddim' for a mask UNet trained with ddpm"),
    (dict(sampler="ddim"), "sampler must be 'rflow' for a mask UNet trained with rflow, got 'ddim'"),
    (dict(context=[0.5] * 9), "context must hold 10 sizes"),
])
def test_bad_sampler_arguments_are_refused(networks, kwargs, message):
    _, unet = networks
    args = dict(context=[0.5] * 10, sampler=None, config=SMALL) | kwargs
    with pytest.raises(ValueError, match=message):
        sample_mask_latent(unet, args["context"], args["config"], seed=0, sampler=args["sampler"], steps=2)
