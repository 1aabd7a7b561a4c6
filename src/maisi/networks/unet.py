"""The latent diffusion UNet conditioned on time, spacing, body region and modality (REFERENCE §1.2)."""

from __future__ import annotations

import torch
from torch import nn

from maisi.config import UNetConfig
from maisi.networks.precision import match_input
from maisi.networks.unet_blocks import (
    Conv,
    DownBlock,
    GroupNorm,
    MidBlock,
    UpBlock,
    mlp,
    timestep_embedding,
    zero_,
)

CONDITION_SCALE = 100.0  # spacing (mm) and region one-hots enter the network ×100, as in the reference


def build_encoder(module: nn.Module, cfg: UNetConfig, temb_width: int) -> None:
    """Give `module` the encoder half shared by the UNet and the ControlNet: conv_in, time (and modality)
    embedding, down blocks and middle block, under MONAI's key names."""
    ch, sd = cfg.channels, cfg.spatial_dims
    emb = 4 * ch[0]
    module.conv_in = Conv(sd, cfg.in_channels, ch[0])
    module.time_embed = mlp(ch[0], emb)
    if cfg.num_class_embeds is not None:
        module.class_embedding = nn.Embedding(cfg.num_class_embeds, emb)
    module.down_blocks = nn.ModuleList(
        DownBlock(sd, ch[max(i - 1, 0)], ch[i], temb_width, cfg.num_res_blocks, cfg.norm_num_groups, cfg.norm_eps,
                  cfg.attention_levels[i], cfg.num_head_channels[i], cfg.include_fc,
                  downsample=i < len(ch) - 1, resblock_updown=cfg.resblock_updown,
                  context_dim=cfg.cross_attention_dim, upcast=cfg.upcast_attention)
        for i in range(len(ch))
    )
    module.middle_block = MidBlock(sd, ch[-1], temb_width, cfg.norm_num_groups, cfg.norm_eps,
                                   cfg.num_head_channels[-1], cfg.include_fc,
                                   context_dim=cfg.cross_attention_dim, upcast=cfg.upcast_attention)


def embed_time(module: nn.Module, cfg: UNetConfig, x: torch.Tensor, t: torch.Tensor,
               modality: torch.Tensor | None) -> torch.Tensor:
    """time_embed(sinusoid(t)) + modality embedding (added, REFERENCE §1.2)."""
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"need one timestep per sample: t has shape {tuple(t.shape)}, batch is {x.shape[0]}")
    emb = module.time_embed(timestep_embedding(t, cfg.channels[0]).to(x.dtype))
    if cfg.num_class_embeds is not None:
        if modality is None:
            raise ValueError("this model is conditioned on modality: pass modality codes (1 = CT, 0 = unconditional)")
        modality = torch.as_tensor(modality, device=x.device).long().reshape(-1).expand(x.shape[0])
        if modality.min() < 0 or modality.max() >= cfg.num_class_embeds:
            raise ValueError(f"modality codes must be in 0..{cfg.num_class_embeds - 1}, got {modality.tolist()}")
        emb = emb + module.class_embedding(modality).to(x.dtype)
    elif modality is not None:
        raise ValueError("this model takes no modality input (ddpm-ct); leave modality out")
    return emb


def check_context(cfg: UNetConfig, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
    """The cross-attention context as N×L×D (a batch of one is broadcast), or None for models without one."""
    if cfg.cross_attention_dim is None:
        if context is not None:
            raise ValueError("this model has no cross-attention (cross_attention_dim is None); leave context out")
        return None
    d = cfg.cross_attention_dim
    if context is None:
        raise ValueError(f"this model is conditioned on a context: pass context of shape N×L×{d}")
    context = torch.as_tensor(context, device=x.device, dtype=x.dtype)
    if context.ndim != 3 or context.shape[2] != d or context.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"context must have shape N×L×{d} (N = {x.shape[0]} or 1), got {tuple(context.shape)}")
    return context.expand(x.shape[0], *context.shape[1:])


def check_latent(cfg: UNetConfig, x: torch.Tensor) -> None:
    if x.ndim != cfg.spatial_dims + 2 or x.shape[1] != cfg.in_channels:
        raise ValueError(
            f"expected a latent of shape N×{cfg.in_channels}×{'×'.join(['S'] * cfg.spatial_dims)}, got {tuple(x.shape)}"
        )
    f = cfg.downsample_factor
    if any(s % f for s in x.shape[2:]):
        raise ValueError(
            f"latent spatial size {tuple(x.shape[2:])} must be divisible by {f} (the UNet downsamples "
            f"{len(cfg.channels) - 1} times); for images that means multiples of {4 * f} voxels"
        )


class DiffusionUNet(nn.Module):
    """ε- or v-predicting UNet on VAE latents; conditions are keyword arguments of `forward`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, emb = cfg.channels, 4 * cfg.channels[0]
        n_extra = (2 if cfg.include_region_input else 0) + (1 if cfg.include_spacing_input else 0)
        temb_width = emb * (1 + n_extra)  # extra conditions are concatenated to the time embedding
        build_encoder(self, cfg, temb_width)
        if cfg.include_region_input:
            self.top_region_index_layer = mlp(cfg.num_region_classes, emb)
            self.bottom_region_index_layer = mlp(cfg.num_region_classes, emb)
        if cfg.include_spacing_input:
            self.spacing_layer = mlp(3, emb)
        if cfg.context_embedding:  # maisi's own option (UNetConfig.context_embedding)
            self.context_embed = mlp(cfg.cross_attention_dim, emb)
        rev = list(reversed(ch))
        self.up_blocks = nn.ModuleList(
            UpBlock(cfg.spatial_dims, rev[min(i + 1, len(ch) - 1)], rev[max(i - 1, 0)], rev[i], temb_width,
                    cfg.num_res_blocks + 1, cfg.norm_num_groups, cfg.norm_eps, cfg.attention_levels[::-1][i],
                    cfg.num_head_channels[::-1][i], cfg.include_fc, upsample=i < len(ch) - 1,
                    resblock_updown=cfg.resblock_updown, context_dim=cfg.cross_attention_dim,
                    upcast=cfg.upcast_attention)
            for i in range(len(ch))
        )
        self.out = nn.Sequential(
            GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps), nn.SiLU(),
            zero_(Conv(cfg.spatial_dims, ch[0], cfg.out_channels)),
        )

    def _conditions(self, x: torch.Tensor, emb: torch.Tensor, spacing: torch.Tensor | None,
                    top_region: torch.Tensor | None, bottom_region: torch.Tensor | None) -> torch.Tensor:
        cfg, n = self.config, x.shape[0]
        parts = [emb]
        given = {"top_region": top_region, "bottom_region": bottom_region, "spacing": spacing}
        wanted = {"top_region": cfg.include_region_input, "bottom_region": cfg.include_region_input,
                  "spacing": cfg.include_spacing_input}
        for name, value in given.items():
            if wanted[name] and value is None:
                raise ValueError(f"this model is conditioned on {name}: pass it (N×{3 if name == 'spacing' else 4})")
            if not wanted[name] and value is not None:
                raise ValueError(f"this model takes no {name} input; leave it out")
        layers = [("top_region", getattr(self, "top_region_index_layer", None)),
                  ("bottom_region", getattr(self, "bottom_region_index_layer", None)),
                  ("spacing", getattr(self, "spacing_layer", None))]
        for name, layer in layers:
            if layer is None:
                continue
            value = torch.as_tensor(given[name], device=x.device, dtype=x.dtype)
            width = layer[0].in_features
            value = value.reshape(-1, width).expand(n, width) if value.numel() == width else value
            if value.shape != (n, width):
                raise ValueError(f"{name} must have shape N×{width} (N = {n}), got {tuple(value.shape)}")
            parts.append(layer(value * CONDITION_SCALE))
        return torch.cat(parts, dim=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        spacing: torch.Tensor | None = None,
        top_region: torch.Tensor | None = None,
        bottom_region: torch.Tensor | None = None,
        modality: torch.Tensor | None = None,
        down_residuals: list[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: N×C×latent, t: N float timesteps in [0, T], spacing: N×3 mm, regions: N×4 one-hot,
        modality: N codes, context: N×L×cross_attention_dim (models with cross-attention only);
        ControlNet residuals are added out of place (so both nets can train)."""
        check_latent(self.config, x)
        in_dtype, x = x.dtype, match_input(self.conv_in.conv, x)  # see maisi.networks.precision
        context = check_context(self.config, x, context)
        emb = embed_time(self, self.config, x, torch.as_tensor(t, device=x.device), modality)
        if self.config.context_embedding:
            emb = emb + self.context_embed(context.mean(dim=1))
        emb = self._conditions(x, emb, spacing, top_region, bottom_region)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, emb, context)
            skips.extend(s)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} ControlNet down residuals, got {len(down_residuals)}")
            skips = [s + r.to(s.dtype) for s, r in zip(skips, down_residuals)]
            # The deepest skip is the middle block's input: the reference adds in place, so it sees the residual.
            h = skips[-1]
        h = self.middle_block(h, emb, context)
        if mid_residual is not None:
            h = h + mid_residual.to(h.dtype)
        for block in self.up_blocks:
            h = block(h, skips, emb, context)
        return self.out(h).to(in_dtype).contiguous()  # no-ops in fp32 contiguous

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Known historical key layouts → the current one, each change reported.

        - MONAI < 1.4 attention keys (`attentions.j.to_q`, ...) move under `attentions.j.attn.`.
        - `proj_attn` (the old name of the attention output projection) becomes `attn.out_proj` for
          networks that have one (v2), and is dropped, with a note, for those that do not (older
          ddpm-ct files carry these unused weights).
        - MONAI Generative's transformer output projection `to_out.0` becomes `out_proj`, and its v1
          upsampler conv `upsampler.conv` becomes `upsampler.postconv` (the mask UNet, REFERENCE §8).
        """
        notes: list[str] = []
        out: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            new = k
            if ".transformer_blocks." in k:
                new = new.replace(".to_out.0.", ".out_proj.")
            elif ".attn." not in k:
                for p in ("to_q", "to_k", "to_v"):
                    new = new.replace(f".{p}.", f".attn.{p}.")
            if not self.config.resblock_updown and ".upsampler.conv.conv." in new:
                new = new.replace(".upsampler.conv.conv.", ".upsampler.postconv.conv.")
            if ".proj_attn." in k:
                if not self.config.include_fc:
                    notes.append(f"dropped unused key {k} (this network has no attention output projection)")
                    continue
                new = new.replace(".attn.proj_attn.", ".attn.out_proj.").replace(".proj_attn.", ".attn.out_proj.")
            if new != k:
                notes.append(f"renamed {k} -> {new}")
            out[new] = v
        return out, notes
