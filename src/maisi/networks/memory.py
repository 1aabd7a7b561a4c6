"""Peak-memory estimates for split encode/decode, and the memory-aware `encode_within`/`decode_within`."""

from __future__ import annotations

import math

import torch
from torch import nn

from maisi.networks.split import SplitConv

GB = 1024**3
SAFETY = 1.1  # allocator slack over the layer-shape estimate (validated with ru_maxrss, README "Numbers")


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_peak(model: nn.Module, op: str, shape: tuple[int, ...], num_splits: int, axis: int = 0,
                  dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak bytes (activations + weights) of split `encode`/`decode` on an input of `shape`.

    Walks the blocks the way `Coder.run` executes them: the live full-size tensors of each step (input,
    output, a ResBlock's hidden tensor) plus the per-segment temporaries of the conv running at that step
    (normalised fp32 input rows with their halo, the cast/padded copy, the conv output rows).
    """
    from maisi.networks.autoencoder import Downsample, ResBlock, Upsample

    b = _bytes(dtype)
    n, spatial = shape[0], list(shape[2:])
    weights = sum(p.numel() for p in model.parameters()) * (4 + (b if b != 4 else 0))

    def vox(sizes: list[int]) -> int:
        return n * math.prod(sizes)

    def seg_temp(cin: int, cout: int, sizes: list[int], pre: bool = True, up: bool = False) -> int:
        s = list(sizes)
        s[axis] = math.ceil(s[axis] / max(1, min(num_splits, s[axis]))) + 3  # rows + halo
        e = vox(s)
        # fp32 normalised rows (+ a cast copy when not fp32) + the padded copy (+ the upsampled rows); conv rows
        return e * cin * ((4 + (b if b != 4 else 0) if pre else 0) + b + (b if up else 0)) + e * cout * b

    def norm_temp(c: int, sizes: list[int]) -> int:
        s = list(sizes)
        s[axis] = math.ceil(s[axis] / max(1, min(num_splits, s[axis])))
        return 4 * c * vox(s) if b != 4 else 0  # var_mean reads fp32 rows in place; other dtypes are cast

    coder = model.encoder if op == "encode" else model.decoder
    c = shape[1]
    io = vox(spatial) * c * 4  # the caller's input
    peak = 0
    pre = False
    for block in coder.blocks:
        if isinstance(block, nn.GroupNorm):
            pre = True
            peak = max(peak, io + vox(spatial) * c * b + norm_temp(c, spatial))
        elif isinstance(block, SplitConv):
            cout = block.conv.conv.out_channels
            peak = max(peak, io + vox(spatial) * (c + cout) * b + seg_temp(c, cout, spatial, pre))
            c, pre = cout, False
        elif isinstance(block, ResBlock):
            cout = block.conv1.conv.conv.out_channels
            # ResBlock.run: equal channels keep x and h; halving writes back into x (two lagged segments);
            # growing channels keep x, h and the output
            extra = cout if c == cout else (0 if 2 * cout <= c else 2 * cout)
            lag = 2 * seg_temp(0, cout, spatial) if 2 * cout <= c else 0
            full = vox(spatial) * (c + extra) * b
            peak = max(peak, io + full + lag + max(seg_temp(max(c, cout), cout, spatial), norm_temp(max(c, cout), spatial)))
            c = cout
        elif isinstance(block, Downsample | Upsample):
            small = list(spatial)
            spatial = [(d + 1) // 2 for d in spatial] if isinstance(block, Downsample) else [2 * d for d in spatial]
            big = spatial if isinstance(block, Upsample) else small
            peak = max(peak, io + (vox(small) + vox(spatial)) * c * b + seg_temp(c, c, big, pre=False, up=True))
    return int(SAFETY * (peak + weights + vox(spatial) * c * 4))


def _candidates(max_len: int) -> list[int]:
    return list(range(1, max(1, max_len) + 1))


def choose_splits(model: nn.Module, op: str, shape: tuple[int, ...], memory_gb: float, axis: int = 0,
                  dtype: torch.dtype = torch.float32) -> int:
    """The smallest num_splits whose estimated peak fits `memory_gb`; ValueError naming the minimum."""
    factor = model.config.downsample_factor
    max_len = shape[2 + axis] * (factor if op == "decode" else 1)
    best = None
    for k in _candidates(max_len):
        est = estimate_peak(model, op, shape, k, axis, dtype)
        if est <= memory_gb * GB:
            return k
        best = est if best is None else min(best, est)
    raise ValueError(
        f"{op} of shape {tuple(shape)} needs at least {best / GB:.2f} GB even with {max_len} splits along axis "
        f"{axis}; the budget is {memory_gb:.2f} GB. Raise memory_gb, use a lower-precision dtype, or pass "
        "sliding_window=True"
    )


def within(model: nn.Module, op: str, x: torch.Tensor, memory_gb: float | None, *, sliding_window: bool = False,
           roi_size: tuple[int, ...] | None = None, overlap: float = 0.25, split_axis: int | None = None,
           **kw):
    """Run `model.encode`/`model.decode` split so that the estimated peak fits `memory_gb` (None: config).

    With `sliding_window=True` and a budget no split count can meet, fall back to MONAI's
    sliding_window_inference with Gaussian blending (approximate: seams are blended, not exact).
    """
    fn = model.encode if op == "encode" else model.decode
    axis = model.config.split_axis if split_axis is None else split_axis
    with torch.no_grad():
        if memory_gb is None:
            return fn(x, split_axis=axis, **kw)
        if memory_gb <= 0:
            raise ValueError(f"memory_gb must be positive, got {memory_gb}")
        dtype = kw.get("dtype") or torch.float32
        try:
            k = choose_splits(model, op, tuple(x.shape), memory_gb, axis, dtype)
        except ValueError:
            if not sliding_window:
                raise
            return _sliding(model, op, x, memory_gb, roi_size, overlap, axis, kw)
        return fn(x, num_splits=k, split_axis=axis, **kw)


def _sliding(model, op, x, memory_gb, roi_size, overlap, axis, kw):
    from monai.inferers import sliding_window_inference

    factor = model.config.downsample_factor
    fn = model.encode if op == "encode" else model.decode
    spatial = list(x.shape[2:])
    if roi_size is None:  # halve the largest window axis until a window fits (with the most splits)
        roi = list(spatial)
        while True:
            shape = (1, x.shape[1], *roi)
            need = estimate_peak(model, op, shape, max(roi) * factor, axis, kw.get("dtype") or torch.float32)
            if need * 2 <= memory_gb * GB or max(roi) <= 2 * factor:
                break
            i = roi.index(max(roi))
            roi[i] = max(factor, (roi[i] // 2 // factor) * factor) if op == "encode" else max(2, roi[i] // 2)
        roi_size = tuple(roi)
    k = max(roi_size) * (factor if op == "decode" else 1)

    def predictor(w: torch.Tensor):
        return fn(w, num_splits=k, split_axis=axis, **kw)

    return sliding_window_inference(x, roi_size, 1, predictor, overlap=overlap, mode="gaussian")
