"""Building blocks of the diffusion UNet and ControlNet (MONAI DiffusionModelUNet key layout)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def conv_nd(spatial_dims: int, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> nn.Module:
    return (nn.Conv3d if spatial_dims == 3 else nn.Conv2d)(c_in, c_out, kernel, stride=stride, padding=padding)


class Conv(nn.Module):
    """A convolution stored as `.conv` (the released checkpoints' `...conv.weight` keys)."""

    def __init__(self, spatial_dims: int, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = conv_nd(spatial_dims, c_in, c_out, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_onednn(self.conv, x):
            c = self.conv
            return torch.mkldnn_convolution(x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups)
        return self.conv(x)


_ONEDNN = hasattr(torch, "mkldnn_convolution") and torch.backends.mkldnn.is_available()


def _use_onednn(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether to call oneDNN directly for this CPU fp32 3D inference conv.

    PyTorch picks its im2col kernel for fp32 convs whose N·C·D·H ≤ 20480 (a 2D rule of thumb); for 3D
    maps from 8³ voxels up (e.g. 64 channels at 16³, 256 at 8³) oneDNN is 2–5× faster (benchmarks/unet.py).
    At 4³ the im2col kernel is as fast or faster, so it keeps those. Training (autograd) is left alone.
    """
    return (
        _ONEDNN and x.ndim == 5 and x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
        and x.shape[2] * x.shape[3] * x.shape[4] >= 512 and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= 20480
        and conv.weight.shape[2] > 1 and x.is_contiguous() and conv.weight.is_contiguous()
    )


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps, ordered [cos, sin] (REFERENCE §1.2)."""
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1D tensor of one value per sample, got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises channels_last inputs in the contiguous layout: PyTorch's channels_last CPU
    kernel loses precision when a group's mean is large against its spread (seen as 1e-1 output errors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous() or x.ndim < 4:
            return super().forward(x)
        fmt = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
        return super().forward(x.contiguous()).contiguous(memory_format=fmt)


def mlp(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, c_out), nn.SiLU(), nn.Linear(c_out, c_out))


class ResBlock(nn.Module):
    """GN–SiLU–(resample)–conv + time projection – GN–SiLU–conv (zero-init) + skip."""

    def __init__(self, spatial_dims: int, c_in: int, c_out: int, temb: int, groups: int, eps: float,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.spatial_dims, self.up, self.down = spatial_dims, up, down
        self.norm1 = GroupNorm(groups, c_in, eps=eps)
        self.conv1 = Conv(spatial_dims, c_in, c_out)
        self.time_emb_proj = nn.Linear(temb, c_out)
        self.norm2 = GroupNorm(groups, c_out, eps=eps)
        self.conv2 = zero_(Conv(spatial_dims, c_out, c_out))
        self.skip_connection = nn.Identity() if c_in == c_out else Conv(spatial_dims, c_in, c_out, 1, padding=0)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            pool = F.avg_pool3d if self.spatial_dims == 3 else F.avg_pool2d
            if x.dtype != torch.float32 and x.device.type == "cpu":  # no bf16/fp16 avg_pool3d kernel on CPU
                return pool(x.float(), 2, 2).to(x.dtype)
            return pool(x, 2, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        if self.up or self.down:
            x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        h = h + self.time_emb_proj(F.silu(emb)).reshape(*emb.shape[:1], -1, *([1] * self.spatial_dims))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip_connection(x) + h


class Attention(nn.Module):
    """Multi-head attention of tokens on themselves or on a context (MONAI SABlock / CrossAttentionBlock keys:
    to_q, to_k, to_v, optional out_proj); `upcast` computes it in fp32 whatever the input dtype."""

    def __init__(self, channels: int, heads: int, out_proj: bool, *, context_dim: int | None = None,
                 qkv_bias: bool = True, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or channels, channels, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or channels, channels, bias=qkv_bias)
        self.out_proj = nn.Linear(channels, channels) if out_proj else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        ctx = x if context is None else context.to(x.dtype)

        def split(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)
            return t.float() if self.upcast else t

        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx)))
        return self.out_proj(out.to(x.dtype).transpose(1, 2).reshape(b, n, c))


SelfAttention = Attention  # the name the image UNet's blocks were written with


class SpatialAttention(nn.Module):
    """GroupNorm, self-attention over all voxels, residual."""

    def __init__(self, channels: int, head_channels: int, groups: int, eps: float, out_proj: bool):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=eps)
        self.attn = Attention(channels, channels // head_channels, out_proj)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        h = self.norm(x).reshape(*shape[:2], -1).transpose(1, 2)
        return x + self.attn(h).transpose(1, 2).reshape(shape)


class FeedForward(nn.Module):
    """Linear to 2×4× width, GEGLU (value · GELU(gate)), linear back (MONAI MLPBlock with act="GEGLU")."""

    def __init__(self, channels: int):
        super().__init__()
        self.linear1 = nn.Linear(channels, 8 * channels)
        self.linear2 = nn.Linear(4 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear1(x).chunk(2, dim=-1)
        return self.linear2(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention on the context, GEGLU feed-forward; each pre-LayerNorm and residual
    (MONAI DiffusionUNetTransformerBlock: attn1, attn2, ff.linear1/linear2, norm1..3)."""

    def __init__(self, channels: int, heads: int, context_dim: int, out_proj: bool, upcast: bool):
        super().__init__()
        self.attn1 = Attention(channels, heads, out_proj, qkv_bias=False, upcast=upcast)
        self.ff = FeedForward(channels)
        self.attn2 = Attention(channels, heads, True, context_dim=context_dim, qkv_bias=False, upcast=upcast)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(channels) for _ in range(3))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, 1×1 conv in, one transformer block over all voxels with cross-attention on a context,
    1×1 conv out (zero-initialised), residual (MONAI SpatialTransformer)."""

    def __init__(self, spatial_dims: int, channels: int, head_channels: int, groups: int, eps: float,
                 context_dim: int, out_proj: bool, upcast: bool):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=eps)
        self.proj_in = Conv(spatial_dims, channels, channels, 1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, channels // head_channels, context_dim, out_proj, upcast)]
        )
        self.proj_out = zero_(Conv(spatial_dims, channels, channels, 1, padding=0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        h = self.proj_in(self.norm(x)).reshape(*shape[:2], -1).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.transpose(1, 2).reshape(shape).contiguous())


def attention_block(spatial_dims: int, channels: int, head_channels: int, groups: int, eps: float, out_proj: bool,
                    context_dim: int | None, upcast: bool) -> nn.Module:
    """Self-attention (context_dim None), else a cross-attention transformer on a context_dim context."""
    if context_dim is None:
        return SpatialAttention(channels, head_channels, groups, eps, out_proj)
    return SpatialTransformer(spatial_dims, channels, head_channels, groups, eps, context_dim, out_proj, upcast)


class Downsample(nn.Module):
    """v1: 3×3 stride-2 convolution (`op.conv`)."""

    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        self.op = Conv(spatial_dims, channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """v1: nearest ×2 then 3×3 convolution (`postconv.conv`)."""

    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        self.postconv = Conv(spatial_dims, channels, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.postconv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """Res blocks (+ attention) then an optional downsampler; returns the skips it produced."""

    def __init__(self, spatial_dims: int, c_in: int, c_out: int, temb: int, n_res: int, groups: int, eps: float,
                 attention: bool, head_channels: int, out_proj: bool, downsample: bool, resblock_updown: bool,
                 context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(spatial_dims, c_in if i == 0 else c_out, c_out, temb, groups, eps) for i in range(n_res)
        )
        if attention:
            self.attentions = nn.ModuleList(
                attention_block(spatial_dims, c_out, head_channels, groups, eps, out_proj, context_dim, upcast)
                for _ in range(n_res)
            )
        self.downsampler: nn.Module | None = None
        if downsample:
            self.downsampler = (ResBlock(spatial_dims, c_out, c_out, temb, groups, eps, down=True)
                                if resblock_updown else Downsample(spatial_dims, c_out))

    def forward(self, h: torch.Tensor, emb: torch.Tensor,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if hasattr(self, "attentions"):
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsampler is not None:
            h = self.downsampler(h, emb)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    def __init__(self, spatial_dims: int, c: int, temb: int, groups: int, eps: float, head_channels: int, out_proj: bool,
                 context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.resnet_1 = ResBlock(spatial_dims, c, c, temb, groups, eps)
        self.attention = attention_block(spatial_dims, c, head_channels, groups, eps, out_proj, context_dim, upcast)
        self.resnet_2 = ResBlock(spatial_dims, c, c, temb, groups, eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.resnet_2(self.attention(self.resnet_1(h, emb), context), emb)


class UpBlock(nn.Module):
    """Res blocks on [h, skip] concatenations (+ attention) then an optional upsampler."""

    def __init__(self, spatial_dims: int, c_in: int, c_prev: int, c_out: int, temb: int, n_res: int, groups: int,
                 eps: float, attention: bool, head_channels: int, out_proj: bool, upsample: bool,
                 resblock_updown: bool, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(spatial_dims, (c_prev if i == 0 else c_out) + (c_in if i == n_res - 1 else c_out), c_out,
                     temb, groups, eps)
            for i in range(n_res)
        )
        if attention:
            self.attentions = nn.ModuleList(
                attention_block(spatial_dims, c_out, head_channels, groups, eps, out_proj, context_dim, upcast)
                for _ in range(n_res)
            )
        self.upsampler: nn.Module | None = None
        if upsample:
            self.upsampler = (ResBlock(spatial_dims, c_out, c_out, temb, groups, eps, up=True)
                              if resblock_updown else Upsample(spatial_dims, c_out))

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if hasattr(self, "attentions"):
                h = self.attentions[i](h, context)
        if self.upsampler is not None:
            h = self.upsampler(h, emb)
        return h
