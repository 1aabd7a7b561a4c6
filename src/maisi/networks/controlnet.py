"""ControlNet: a trainable copy of the UNet encoder conditioned on a label mask (REFERENCE §1.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maisi.config import ControlNetConfig, UNetConfig
from maisi.networks.precision import match_input
from maisi.networks.unet import build_encoder, check_latent, embed_time
from maisi.networks.unet_blocks import Conv, conv_nd, zero_


def mask_to_bit_planes(mask: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """N×1×X×Y×Z integer label map → N×bits×X×Y×Z float planes, plane k = bit k of the label id."""
    if mask.ndim < 3 or mask.shape[1] != 1:
        raise ValueError(f"mask must be N×1×spatial (an integer label map), got {tuple(mask.shape)}")
    if mask.is_floating_point():
        if not torch.equal(mask, mask.round()):
            raise ValueError("mask must hold integer label ids, got fractional values")
    m = mask.long()
    if m.numel() and (m.min() < 0 or m.max() >= 2**bits):
        raise ValueError(f"label ids must be in 0..{2**bits - 1}, got {int(m.min())}..{int(m.max())}")
    powers = (2 ** torch.arange(bits, device=m.device)).view(1, bits, *([1] * (m.ndim - 2)))
    return ((m & powers) != 0).float()


class ConditioningEmbedding(nn.Module):
    """conv (SiLU), then [conv, stride-2 conv] per stage (SiLU), then a zero-initialised conv."""

    def __init__(self, spatial_dims: int, c_in: int, channels: tuple[int, ...], c_out: int):
        super().__init__()
        self.conv_in = Conv(spatial_dims, c_in, channels[0])
        blocks = []
        for a, b in zip(channels[:-1], channels[1:]):
            blocks += [Conv(spatial_dims, a, a), Conv(spatial_dims, a, b, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = zero_(Conv(spatial_dims, channels[-1], c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNet(nn.Module):
    """Encoder copy + mask embedding; returns residuals for the UNet's skips and middle block."""

    def __init__(self, unet_config: UNetConfig, config: ControlNetConfig | None = None):
        super().__init__()
        self.unet_config = cfg = unet_config
        self.config = config = config or ControlNetConfig()
        ch, sd = cfg.channels, cfg.spatial_dims
        build_encoder(self, cfg, 4 * ch[0])  # no spacing/region inputs: temb width 4·ch0
        self.controlnet_cond_embedding = ConditioningEmbedding(
            sd, config.conditioning_in_channels, config.conditioning_channels, ch[0]
        )
        # Zero-initialised 1×1 convs: the first is a bare conv (the released keys' quirk).
        blocks: list[nn.Module] = [zero_(conv_nd(sd, ch[0], ch[0], 1, padding=0))]
        for i, c in enumerate(ch):
            for _ in range(cfg.num_res_blocks + (1 if i < len(ch) - 1 else 0)):
                blocks.append(zero_(Conv(sd, c, c, 1, padding=0)))
        self.controlnet_down_blocks = nn.ModuleList(blocks)
        self.controlnet_mid_block = zero_(Conv(sd, ch[-1], ch[-1], 1, padding=0))

    @property
    def mask_factor(self) -> int:
        """The mask is at image resolution: this many times the latent per axis."""
        return 2 ** (len(self.config.conditioning_channels) - 1)

    @classmethod
    def from_unet(cls, unet: nn.Module, config: ControlNetConfig | None = None) -> ControlNet:
        """A ControlNet whose encoder copies every UNet tensor of the same name and shape."""
        net = cls(unet.config, config)
        own = net.state_dict()
        copied = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
        net.load_state_dict(copied, strict=False)
        net.copied_from_unet = sorted(copied)
        return net

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, *, modality: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: N×C×latent, t: N timesteps, mask: N×1×image-size integer label map (ids 0..255)."""
        check_latent(self.unet_config, x)
        expected = tuple(s * self.mask_factor for s in x.shape[2:])
        if tuple(mask.shape[2:]) != expected or mask.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"mask must be N×1×{'×'.join(map(str, expected))} (image resolution, {self.mask_factor}× the "
                f"latent {tuple(x.shape[2:])}), got {tuple(mask.shape)}"
            )
        x = match_input(self.conv_in.conv, x)  # see maisi.networks.precision
        cond = match_input(self.controlnet_cond_embedding.conv_in.conv,
                           mask_to_bit_planes(mask, self.config.conditioning_in_channels))
        emb = embed_time(self, self.unet_config, x, torch.as_tensor(t, device=x.device), modality)
        h = self.conv_in(x) + self.controlnet_cond_embedding(cond).expand(x.shape[0], -1, *x.shape[2:])
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, emb)
            skips.extend(s)
        h = self.middle_block(h, emb)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        return down, self.controlnet_mid_block(h)
