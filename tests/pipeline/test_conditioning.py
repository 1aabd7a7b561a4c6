"""Every input of `Pipeline.generate` reaches the output: spacing, body region, modality, guidance, the mask,
the sampler and its timesteps, the step count and the latent scale factor.

Fresh networks predict exactly 0 (zero-initialised output layers), so sampling would return the noise whatever
the inputs; these networks have those layers randomised (conftest `random_tiny_networks`). Each test generates
twice, differing in one input only, and compares the latents the sampler returned (and the image)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from maisi.config import preset
from maisi.data.phantom import make_phantom
from maisi.diffusion.sampling import make_noise
from maisi.io.volume import write_volume
from maisi.pipeline.masks import phantom_database
from maisi.pipeline.models import Networks
from maisi.pipeline.pipeline import Pipeline
from maisi.pipeline.validation import GenerationRequest

FAST = dict(size=(32, 32, 32), spacing=(8.0, 8.0, 8.0), steps=2, quality_check=False, body_region=("chest",))
NO_MASK = {"mask_source": "none", "body_region": ()}
CHANGED = 1e-3  # a changed input moves the networks' share of the latents (z − noise) by > 0.1 % (rounding: ~1e-6)


def pipeline(nets: dict, config=None, scale_factor: float = 1.0, schedule: str = "rflow") -> Pipeline:
    """A pipeline over in-memory networks (nothing saved or loaded)."""
    config = config or preset("tiny")
    sources = {c: {"path": "<memory>", "sha256": "0" * 64, "format": "maisi"} for c in nets}
    networks = Networks(nets["autoencoder"], nets["unet"], nets["controlnet"], config, scale_factor, sources,
                        trained_schedule=schedule)
    return Pipeline(networks, device="cpu", progress=False)


@pytest.fixture(scope="module")
def nets(random_tiny_networks, one_thread) -> dict:
    return random_tiny_networks(std=0.2)  # the mask passes two randomised ControlNet layers in series: not tiny


@pytest.fixture(scope="module")
def pipe(nets) -> Pipeline:
    return pipeline(nets)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A phantom mask database and two user masks on the same grid (a chest and an abdomen phantom)."""
    root = tmp_path_factory.mktemp("masks")
    out = {"database": str(phantom_database(root / "db", variants=1, size=32, spacing=8.0))}
    for region in ("chest", "abdomen"):
        ph = make_phantom(region, size=32, spacing=8.0, seed=3)
        out[region] = str(root / f"{region}.nii.gz")
        write_volume(out[region], ph.label, ph.affine, np.uint8)
    return out


def run(pipe: Pipeline, files: dict, **change) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(noise, latents the sampler returned, int16 image) of one sample; `mask="chest"` names a file of `files`."""
    fields = {**FAST, "mask_database": files["database"], **change}
    if "mask" in change:
        fields["mask"] = files[change["mask"]]
    request = GenerationRequest(**fields)
    seen = []
    decode = pipe.decode
    pipe.decode = lambda z, *a, **kw: seen.append(z.clone()) or decode(z, *a, **kw)
    try:
        (s,) = pipe.generate(request)
    finally:
        del pipe.decode
    noise = make_noise(pipe.latent_shape(pipe.plan(request)), [request.seed])
    return noise, seen[0], s.image


def moved(a: tuple, b: tuple) -> float:
    """How far the latents of run b are from those of run a, relative to the networks' share in a."""
    (noise, za, _), (_, zb, _) = a, b
    return float((zb - za).norm() / (za - noise).norm())


def test_the_networks_change_the_noise(pipe, files):
    """The premise of this file: with randomised output layers the sampler does not return the noise."""
    noise, z, _ = run(pipe, files)
    assert float((z - noise).norm() / noise.norm()) > 1e-3


def test_same_inputs_give_identical_output(pipe, files):
    (_, za, ia), (_, zb, ib) = run(pipe, files, seed=5), run(pipe, files, seed=5)
    assert torch.equal(za, zb) and np.array_equal(ia, ib)


@pytest.mark.parametrize("a, b, threshold", [
    pytest.param({}, {"seed": 1}, CHANGED, id="seed"),
    pytest.param(NO_MASK, {**NO_MASK, "spacing": (6.0, 8.0, 8.0)}, CHANGED, id="spacing"),  # not via the mask grid
    pytest.param({}, {"modality": "mri"}, CHANGED, id="modality"),
    pytest.param({}, {"guidance": 3.0}, CHANGED, id="guidance"),
    pytest.param({}, {"steps": 3}, CHANGED, id="steps"),
    # NVIDIA's float16 / int() timesteps differ from the clean ones by under 1 of 1000: a small but real move
    pytest.param({"steps": 3, "timesteps": "clean"}, {"steps": 3, "timesteps": "reference"}, 1e-4, id="timesteps"),
    pytest.param({}, {"body_region": ("abdomen",)}, CHANGED, id="body-region-picks-the-mask"),
    pytest.param({"mask": "chest", "body_region": ()}, {"mask": "abdomen", "body_region": ()}, CHANGED, id="mask"),
    pytest.param({"body_region": ()}, NO_MASK, CHANGED, id="mask-or-none"),
])
def test_each_input_changes_the_latents(pipe, files, a, b, threshold):
    """The tiny preset has no region input: a body region reaches it through the database mask it picks."""
    ra, rb = run(pipe, files, **a), run(pipe, files, **b)
    assert moved(ra, rb) > threshold
    assert not np.array_equal(ra[2], rb[2])


def test_body_region_reaches_a_region_conditioned_unet(random_tiny_networks, files):
    """A v1-style UNet (top and bottom region one-hots) without a mask: only the region input differs."""
    tiny = preset("tiny")
    cfg = replace(tiny, unet=replace(tiny.unet, include_region_input=True))
    pipe = pipeline(random_tiny_networks(cfg), cfg)
    none = {"mask_source": "none"}
    a, b = run(pipe, files, **none), run(pipe, files, **none, body_region=("abdomen",))
    assert moved(a, b) > CHANGED
    assert moved(a, run(pipe, files, **none, body_region=("chest", "abdomen"))) > CHANGED  # the bottom region


def test_sampler_reaches_the_output(random_tiny_networks, files):
    """A DDPM-trained model samples with DDPM or DDIM: the choice changes the latents."""
    tiny = preset("tiny")
    cfg = replace(tiny, scheduler=replace(tiny.scheduler, kind="ddpm"))
    pipe = pipeline(random_tiny_networks(cfg), cfg, schedule="ddpm")
    assert moved(run(pipe, files, sampler="ddim"), run(pipe, files, sampler="ddpm")) > CHANGED


def test_scale_factor_divides_the_latents_before_decoding(nets, files):
    """The latents do not depend on the scale factor; the image does (z / scale_factor is decoded)."""
    (_, z1, i1), (_, z2, i2) = run(pipeline(nets, scale_factor=1.0), files), run(pipeline(nets, scale_factor=2.0), files)
    assert torch.equal(z1, z2)
    assert np.abs(i1.astype(np.float32) - i2.astype(np.float32)).mean() > 1.0  # HU
