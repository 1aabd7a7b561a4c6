"""The MAISI volume compression network (VAE-GAN generator) with exact tensor splitting (REFERENCE §1.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from maisi.config import AutoencoderConfig
from maisi.networks.autoencoder_blocks import decoder, encoder
from maisi.networks.memory import plan_memory, within
from maisi.networks.split import Conv, Plan
from maisi.networks.stream import StreamPlan

LOGVAR_RANGE = (-30.0, 20.0)
Devices = Sequence[str | torch.device] | None


class Autoencoder(nn.Module):
    """Encoder, decoder and Gaussian posterior; state dict identical to MONAI's AutoencoderKlMaisi.

    `encode`/`decode` use the plain autograd path while gradients are enabled (training, no splitting);
    under `torch.no_grad()` they run the split inference path (exact; `num_splits`/`split_axis` default
    to the config, `devices` places segments round-robin, `dtype` picks the compute precision with
    GroupNorm statistics in fp32). `forward` samples mu + sigma·eps in training mode and uses mu in eval.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        sd, lat = config.spatial_dims, config.latent_channels
        self.encoder = encoder(config)
        self.decoder = decoder(config)
        self.quant_conv_mu = Conv(sd, lat, lat, 1)
        self.quant_conv_log_sigma = Conv(sd, lat, lat, 1)
        self.post_quant_conv = Conv(sd, lat, lat, 1)

    # -- input checks -------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, channels: int, what: str, divisible: int = 1) -> None:
        sd = self.config.spatial_dims
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{what} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.ndim != sd + 2:
            raise ValueError(f"{what} must be N×C×{'×'.join('XYZ'[:sd])} ({sd + 2} dims), got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{what} must have {channels} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        if any(d % divisible for d in x.shape[2:]) or min(x.shape[2:]) < 1:
            raise ValueError(
                f"{what} spatial size {tuple(x.shape[2:])} must be a positive multiple of {divisible} "
                f"on every axis (the encoder downsamples ×{divisible}); crop or pad it"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what} contains NaN or inf values; only finite values are allowed")

    def _plan(self, num_splits, split_axis, devices, dtype, channels_last, device: torch.device) -> Plan:
        c = self.config
        n = c.num_splits if num_splits is None else int(num_splits)
        axis = c.split_axis if split_axis is None else int(split_axis)
        if n < 1 or not 0 <= axis < c.spatial_dims:
            raise ValueError(f"num_splits must be >= 1 and split_axis in 0..{c.spatial_dims - 1}, got {n}, {axis}")
        dtype = dtype or torch.float32
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        devs = tuple(torch.device(d) for d in devices) if devices else ()
        # oneDNN's 3D convs are faster in channels_last_3d: ~2.5x for bf16 (REFERENCE §6), ~10 % for fp32 on
        # a CPU (a 128³ decode: 46-48 s against 51-53 s, equal to 2e-5); GPUs keep fp32 contiguous
        if channels_last is None:
            cl = dtype != torch.float32 or (device.type == "cpu" and not devices)
        else:
            cl = bool(channels_last)
        return Plan(n, axis, devs, dtype, cl and c.spatial_dims == 3)

    def _grad_path(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    # -- public API ---------------------------------------------------------------------------------
    def encode(
        self, x: torch.Tensor, *, num_splits: int | None = None, split_axis: int | None = None,
        devices: Devices = None, dtype: torch.dtype | None = None, channels_last: bool | None = None,
        stream: StreamPlan | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image N×in×X×Y×Z (each axis a multiple of the downsample factor) → (mu, sigma) latents.

        With `stream`, the encoder runs tile by tile with big maps out of core (networks.stream; its own
        dtype and devices apply, the split options are ignored).
        """
        self._check(x, self.config.in_channels, "image", self.config.downsample_factor)
        if self._grad_path(x):
            h = self.encoder(x)
        elif stream is not None:
            with torch.no_grad():
                h = torch.cat([self.encoder.stream(x[i:i + 1], stream).float() for i in range(x.shape[0])])
        else:
            with torch.no_grad():
                plan = self._plan(num_splits, split_axis, devices, dtype, channels_last, x.device)
                h = self.encoder.run(x.to(plan.dtype), plan).float()
        mu = self.quant_conv_mu(h)
        logvar = self.quant_conv_log_sigma(h).clamp(*LOGVAR_RANGE)
        return mu, torch.exp(logvar / 2)

    def decode(
        self, z: torch.Tensor, *, num_splits: int | None = None, split_axis: int | None = None,
        devices: Devices = None, dtype: torch.dtype | None = None, channels_last: bool | None = None,
        stream: StreamPlan | None = None, argmax: bool = False,
    ) -> torch.Tensor:
        """Latent N×latent×x×y×z → image N×out×(f·x)×(f·y)×(f·z), f the downsample factor.

        With `stream`, the decoder runs tile by tile with big maps out of core (see `encode`). With `argmax`,
        the result is the argmax over the output channels (N×1×..., int64 class indices), taken segment by
        segment or tile by tile so that the out-channel map is never held whole (the mask autoencoder's logits).
        """
        self._check(z, self.config.latent_channels, "latent")
        if self._grad_path(z):
            out = self.decoder(self.post_quant_conv(z))
            return out.argmax(1, keepdim=True) if argmax else out
        if stream is not None:
            with torch.no_grad():
                h = self.post_quant_conv(z.float())
                parts = [self.decoder.stream(h[i:i + 1], stream, argmax) for i in range(z.shape[0])]
                return torch.cat(parts if argmax else [p.float().contiguous() for p in parts])
        with torch.no_grad():
            plan = self._plan(num_splits, split_axis, devices, dtype, channels_last, z.device)
            h = self.post_quant_conv(z.float()).to(plan.dtype)
            out = self.decoder.run(h, plan, argmax)
            return out if argmax else out.float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mu, sigma); the decoded z is mu + sigma·eps in training mode, mu in eval."""
        mu, sigma = self.encode(x)
        z = mu + sigma * torch.randn_like(sigma) if self.training else mu
        return self.decode(z), mu, sigma

    def plan_within(self, op: str, shape: tuple[int, ...], memory_gb: float | None, *,
                    dtype: torch.dtype | None = None, scratch: str | None = None, device: str | torch.device | None = None,
                    argmax: bool = False):
        """The fastest exact plan for `op` ("encode"/"decode") on `shape` within `memory_gb` (networks.memory);
        `device` defaults to where the weights are."""
        device = device or next(self.parameters()).device
        return plan_memory(self, op, tuple(shape), memory_gb, axis=self.config.split_axis,
                           dtype=dtype or torch.float32, scratch=scratch, device=device, argmax=argmax)

    def encode_within(self, x: torch.Tensor, memory_gb: float | None = None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode` with the fastest exact plan whose estimated peak fits `memory_gb` (or `plan=`; networks.memory)."""
        return within(self, "encode", x, memory_gb, **kw)

    def decode_within(self, z: torch.Tensor, memory_gb: float | None = None, **kw) -> torch.Tensor:
        """`decode` with the fastest exact plan whose estimated peak fits `memory_gb` (or `plan=`; networks.memory)."""
        return within(self, "decode", z, memory_gb, **kw)
