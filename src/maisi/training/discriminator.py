"""The VAE-GAN's 3D PatchGAN discriminator (REFERENCE §4), built on MONAI's PatchDiscriminator."""

from __future__ import annotations

from monai.networks.nets import PatchDiscriminator
from torch import Tensor, nn


class Discriminator(nn.Module):
    """PatchGAN: `num_layers` stride-2 conv blocks (LeakyReLU 0.2, instance norm) → per-patch logits."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, channels: int = 32, num_layers: int = 3,
                 norm: str = "INSTANCE"):
        super().__init__()
        if num_layers < 1 or channels < 1:
            raise ValueError(f"discriminator needs num_layers >= 1 and channels >= 1, got {num_layers}, {channels}")
        self.num_layers = num_layers
        self.net = PatchDiscriminator(
            spatial_dims=spatial_dims, num_layers_d=num_layers, channels=channels,
            in_channels=in_channels, out_channels=1, norm=norm,
        )

    @staticmethod
    def min_size_of(num_layers: int) -> int:
        """Smallest patch edge a `num_layers` discriminator accepts: the stride-1 conv before the head needs >= 2
        voxels to normalise."""
        return 3 * 2**num_layers

    def min_size(self) -> int:
        return self.min_size_of(self.num_layers)

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[2:]) < self.min_size():
            raise ValueError(
                f"the {self.num_layers}-layer discriminator needs patches of at least {self.min_size()} voxels "
                f"per axis, got {tuple(x.shape[2:])}; use a larger patch or fewer disc_layers"
            )
        return self.net(x.contiguous())[-1]
