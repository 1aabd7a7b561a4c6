"""Faster inference settings for the UNet and ControlNet: bf16 weights with fp32 GroupNorm, channels_last_3d."""

from __future__ import annotations

import warnings

import torch
from torch import nn

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of a precision name; ValueError for unknown names or fp16 on a CPU (see `warn_if_slow`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 is for GPUs (PyTorch's CPU fp16 convolutions are slow or missing); "
                         "on a CPU use bf16 or fp32")
    return PRECISIONS[precision]


def warn_if_slow(dtype: torch.dtype, device: torch.device) -> None:
    """A SlowPrecisionWarning for bf16 on a CPU without native bf16 (the code that will run in `dtype` calls this
    once; checking a precision name with `compute_dtype` does not warn)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not native_cpu_bf16():
        warnings.warn(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16: PyTorch's bf16 3D "
                      "convolutions run hundreds of times slower than fp32 here; use fp32", SlowPrecisionWarning,
                      stacklevel=3)


class SlowPrecisionWarning(UserWarning):
    """The precision asked for has no fast kernels on this device."""


def native_cpu_bf16() -> bool:
    """Whether PyTorch's CPU kernels use AVX-512 (with BF16/AMX where present) rather than an emulated bf16."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def for_inference(model: nn.Module, dtype: torch.dtype = torch.bfloat16, channels_last: bool = False) -> nn.Module:
    """Convert `model` in place and return it: floating weights to `dtype` except GroupNorm's (kept fp32, so
    normalisation statistics and affine stay fp32), and with `channels_last` the 3D conv weights to
    channels_last_3d (the networks then move their input to that layout). Inputs of any float dtype are
    cast on entry; the UNet returns its output in the input's dtype. State-dict keys are unchanged."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            target = torch.float32 if isinstance(m, nn.GroupNorm) else dtype
            data = p.data.to(target)
            if channels_last and isinstance(m, nn.Conv3d) and name == "weight":
                data = data.contiguous(memory_format=torch.channels_last_3d)
            p.data = data
    return model


def match_input(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x in the dtype and (channels_last_3d or not) layout of `conv`'s weight (a no-op for fp32 contiguous)."""
    w = conv.weight
    x = x.to(w.dtype)
    if x.ndim == 5 and w.shape[2:] != (1, 1, 1) and not w.is_contiguous() and w.is_contiguous(
            memory_format=torch.channels_last_3d):
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x
