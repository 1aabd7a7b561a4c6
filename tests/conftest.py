"""Shared test fixtures."""

import pytest
import torch

from maisi.config import preset
from maisi.networks import build
from maisi.networks.controlnet import ControlNet


@pytest.fixture(scope="module")
def one_thread():
    """Small convolutions on a shared, oversubscribed 2-core machine run ~40× faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def random_tiny_networks():
    """`make(config=preset("tiny"), seed=0, std=0.05)`: a tiny autoencoder, UNet and ControlNet (in eval mode)
    whose zero-initialised layers (UNet output conv, residual conv2s, ControlNet zero convs and mask-embedding
    output) are redrawn from N(0, std²) under `seed`. Fresh, those layers make every prediction exactly 0, so
    sampling returns the noise whatever the conditions; randomised, every input reaches the output."""

    def make(config=None, seed: int = 0, std: float = 0.05) -> dict[str, torch.nn.Module]:
        cfg = config or preset("tiny")
        torch.manual_seed(seed)
        unet = build("unet", cfg)
        nets = {"autoencoder": build("autoencoder", cfg), "unet": unet,
                "controlnet": ControlNet.from_unet(unet, cfg.controlnet)}
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for net in nets.values():
                for p in net.parameters():
                    if not p.any():
                        p.copy_(torch.randn(p.shape, generator=g) * std)
                net.eval()
        return nets

    return make
