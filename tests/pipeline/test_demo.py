"""The demo recipe: a decoder-only step on top of a model keeps its latent space and its diffusion networks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from maisi.pipeline.demo import DemoRecipe, train_demo
from maisi.pipeline.models import demo_model_dir
from maisi.training.vae import ENCODER_PARTS


@pytest.mark.parametrize("fields, message", [
    ({"vae_decoder_steps": -1}, "vae_decoder_steps must be >= 0"),
    ({"diffusion_steps": 0}, "diffusion_steps = 0 keeps init's network, but no init"),
    ({"controlnet_steps": 0, "diffusion_steps": 0}, "diffusion_steps and controlnet_steps = 0"),
    ({"vae_steps": 0}, "no init model folder gives an autoencoder"),
])
def test_recipe_refuses_what_it_cannot_do(fields, message):
    with pytest.raises(ValueError, match=message):
        DemoRecipe(**fields)


def test_decoder_only_step_keeps_the_latent_space_and_the_diffusion_networks(one_thread, tmp_path):
    shipped = demo_model_dir()
    recipe = DemoRecipe(size=32, spacing=8.0, phantoms_per_region=1, vae_steps=0, vae_decoder_steps=2,
                        bright_weight=4.0, diffusion_steps=0, controlnet_steps=0, init=str(shipped))
    model = train_demo(tmp_path / "work", recipe, progress=False)

    def weights(folder, comp):
        return load_file(str(folder / comp / "model.safetensors"))

    for comp in ("unet", "controlnet"):  # kept as they were
        assert (model / comp / "model.safetensors").read_bytes() == (shipped / comp / "model.safetensors").read_bytes()
    old, new = weights(shipped, "autoencoder"), weights(model, "autoencoder")
    encoder = [k for k in old if k.split(".")[0] in ENCODER_PARTS]
    decoder = [k for k in old if k not in encoder]
    assert encoder and all(torch.equal(old[k], new[k]) for k in encoder)
    assert any(not torch.equal(old[k], new[k]) for k in decoder)
    recorded = json.loads((model / "generation.json").read_text())["recipe"]
    assert recorded["vae_decoder_steps"] == 2 and recorded["bright_weight"] == 4.0
