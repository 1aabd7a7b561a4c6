"""The memory planner: peak estimates for every exact plan, and the memory-aware `encode_within`/`decode_within`.

Plans, fastest first: unsplit, in-memory split (the fewest segments along one axis), streaming (3D tiles,
big maps out of core; networks.stream). `plan_memory` picks the first whose estimated peak fits the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from maisi.networks.autoencoder_blocks import Downsample, ResBlock, Upsample
from maisi.networks.split import SplitConv
from maisi.networks.stream import StreamPlan, tile_working_set

GB = 1024**3
SAFETY = 1.1  # allocator slack over the layer-shape estimate (validated with ru_maxrss, docs/autoencoder.md "Numbers")


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_peak(model: nn.Module, op: str, shape: tuple[int, ...], num_splits: int, axis: int = 0,
                  dtype: torch.dtype = torch.float32, argmax: bool = False) -> int:
    """Estimated peak bytes (activations + weights) of split `encode`/`decode` on an input of `shape`; with
    `argmax`, of a decode whose last conv is reduced to int64 class indices segment by segment.

    Walks the blocks the way `Coder.run` executes them: the live full-size tensors of each step (input,
    output, a ResBlock's hidden tensor) plus the per-segment temporaries of the conv running at that step
    (normalised fp32 input rows with their halo, the cast/padded copy, the conv output rows).
    """
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

    coder = model.encoder if op == "encode" else model.decoder
    c = shape[1]
    io = vox(spatial) * c * 4  # the caller's input
    peak = 0
    pre = False
    last = coder.blocks[-1]
    for block in coder.blocks:
        if isinstance(block, nn.GroupNorm):
            pre = True
            peak = max(peak, io + vox(spatial) * c * b)  # statistics: chunk-sized temporaries only
        elif isinstance(block, SplitConv):
            cout = block.conv.conv.out_channels
            held = vox(spatial) * (8 if argmax and block is last else cout * b)  # class indices, or the output
            peak = max(peak, io + vox(spatial) * c * b + held + seg_temp(c, cout, spatial, pre))
            c, pre = cout, False
        elif isinstance(block, ResBlock):
            cout = block.conv1.conv.conv.out_channels
            # ResBlock.run: equal channels keep x and h; halving writes back into x (two lagged segments);
            # growing channels keep x, h and the output
            extra = cout if c == cout else (0 if 2 * cout <= c else 2 * cout)
            lag = 2 * seg_temp(0, cout, spatial) if 2 * cout <= c else 0
            full = vox(spatial) * (c + extra) * b
            peak = max(peak, io + full + lag + seg_temp(max(c, cout), cout, spatial))
            c = cout
        elif isinstance(block, Downsample | Upsample):
            small = list(spatial)
            spatial = [(d + 1) // 2 for d in spatial] if isinstance(block, Downsample) else [2 * d for d in spatial]
            big = spatial if isinstance(block, Upsample) else small
            peak = max(peak, io + (vox(small) + vox(spatial)) * c * b + seg_temp(c, c, big, pre=False, up=True))
    return int(SAFETY * (peak + weights + vox(spatial) * (8 if argmax else c * 4)))


def _candidates(max_len: int) -> list[int]:
    return list(range(1, max(1, max_len) + 1))


def estimate_streaming(model: nn.Module, op: str, shape: tuple[int, ...], plan: StreamPlan,
                       accelerator: bool = False, argmax: bool = False) -> int:
    """Estimated peak bytes of streaming `encode`/`decode` (`Coder.stream`) on an input of `shape`.

    At each conv: the host-resident maps alive then (input, hidden and output of a ResBlock; maps larger
    than `plan.resident_bytes` live on disk and cost only their tile), the tile working set of the edge
    that conv will use, plus what is held throughout: weights, the caller's input and the result. On an
    `accelerator` the maps live in host memory and only the device's share is counted. With `argmax` the
    result is int64 class indices (the last conv's tiles reduced as they come).
    """
    b, nd = _bytes(plan.dtype), len(shape) - 2
    n, spatial = shape[0], list(shape[2:])
    weights = sum(p.numel() for p in model.parameters()) * (4 + (b if b != 4 else 0))

    def held(c: int, sizes: list[int], first: bool = False) -> int:  # host bytes of one map
        size = c * math.prod(sizes) * b
        if accelerator:
            return 0
        return size if first or plan.scratch == "memory" or size <= plan.resident_bytes else 0

    def tile(cin: int, cout: int, stride: int, up: bool, res: int = 0) -> int:
        t = plan.edge(cin, cout, stride, 3, up, res, nd)
        return tile_working_set(t, nd, cin, cout, stride, 3, up, res, plan.dtype)

    coder = model.encoder if op == "encode" else model.decoder
    c, first = shape[1], True
    io = math.prod(spatial) * c * 4 * n + (0 if b == 4 else math.prod(spatial) * c * b)  # input (+ its cast)
    peak = 0
    last = coder.blocks[-1]
    for block in coder.blocks:
        if isinstance(block, SplitConv):
            cout = block.conv.conv.out_channels
            out = math.prod(spatial) * 8 if argmax and block is last else held(cout, spatial)
            peak = max(peak, held(c, spatial, first) + out + tile(c, cout, 1, False))
            c, first = cout, False
        elif isinstance(block, ResBlock):
            cout = block.conv1.conv.conv.out_channels
            x, h = held(c, spatial, first), held(cout, spatial)
            peak = max(peak, x + h + tile(c, cout, 1, False), x + 2 * h + tile(cout, cout, 1, False, c))
            c, first = cout, False
        elif isinstance(block, Downsample | Upsample):
            small, up = list(spatial), isinstance(block, Upsample)
            spatial = [2 * d for d in spatial] if up else [(d + 1) // 2 for d in spatial]
            peak = max(peak, held(c, small, first) + held(c, spatial) + tile(c, c, 1 if up else 2, up))
            first = False
    # the final store, its fp32 copy, the batch cat (class indices: the store and the cat)
    result = math.prod(spatial) * n * (8 * 2 if argmax else c * (b + 4 + 4))
    return int(SAFETY * (peak + weights + io + result))


@dataclass(frozen=True)
class MemoryPlan:
    """How `encode_within`/`decode_within` will run, and the estimated peak it was chosen by."""

    kind: str  # "unsplit", "split", "streaming" or "sliding-window" (approximate)
    estimated_gb: float
    num_splits: int = 1
    split_axis: int = 0
    tile_mb: int | None = None  # streaming: per-tile working set
    resident_mb: int | None = None  # streaming: maps up to this size stay in memory, larger ones on disk
    scratch: str | None = None  # streaming: where the larger maps go ("memory": host memory)

    def stream(self, dtype: torch.dtype, devices: tuple[torch.device, ...] = ()) -> StreamPlan:
        return StreamPlan(tile_bytes=self.tile_mb * 1024**2, resident_bytes=self.resident_mb * 1024**2,
                          scratch=self.scratch, dtype=dtype, devices=devices)

    def describe(self) -> str:
        est = f"estimated peak {self.estimated_gb:.2f} GB"
        if self.kind == "streaming":
            if self.scratch == "memory":
                maps = "feature maps in host memory"
            else:
                maps = f"maps over {self.resident_mb} MB in scratch files in {self.scratch or 'the temp folder'}"
            return f"streaming (3D tiles of <= {self.tile_mb} MB working set; {maps}), {est}"
        if self.kind == "split":
            return f"in-memory split ({self.num_splits} segments along axis {self.split_axis}), {est}"
        return f"{self.kind}, {est}"

    def as_dict(self) -> dict:
        return asdict(self)


STREAM_TILE_MB = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


def plan_memory(model: nn.Module, op: str, shape: tuple[int, ...], memory_gb: float | None, *, axis: int = 0,
                dtype: torch.dtype = torch.float32, scratch: str | Path | None = None,
                device: str | torch.device = "cpu", argmax: bool = False) -> MemoryPlan:
    """The fastest exact plan whose estimated peak fits `memory_gb` (None: the config's split count); `argmax`:
    of a decode to class indices (`Autoencoder.decode(argmax=True)`).

    The budget is the compute device's memory: on a CPU the process's, on a GPU the GPU's (streaming then
    keeps its maps in host memory unless `scratch` names a folder). Raises ValueError naming the smallest
    budget that would fit when nothing does.
    """
    accelerator = torch.device(device).type != "cpu"
    if accelerator and scratch is None:
        scratch = "memory"
    gb = lambda x: x / GB  # noqa: E731
    if memory_gb is None:
        k = model.config.num_splits
        est = estimate_peak(model, op, shape, k, axis, dtype, argmax)
        return MemoryPlan("unsplit" if k == 1 else "split", gb(est), k, axis)
    if not memory_gb > 0:
        raise ValueError(f"memory_gb must be positive, got {memory_gb}")
    budget = memory_gb * GB
    k, est = _fewest_splits(model, op, shape, budget, axis, dtype, argmax)
    if est <= budget:
        return MemoryPlan("unsplit" if k == 1 else "split", gb(est), k, axis)
    scratch = None if scratch is None else str(scratch)

    def streaming(tile_mb: int, resident_mb: int) -> int:
        return estimate_streaming(model, op, shape, StreamPlan(tile_bytes=tile_mb * 1024**2, scratch=scratch,
                                                               resident_bytes=resident_mb * 1024**2, dtype=dtype),
                                  accelerator, argmax)

    best = None
    for tile_mb in STREAM_TILE_MB:
        floor = streaming(tile_mb, 0)
        best = floor if best is None else min(best, floor)
        if floor > budget:
            continue
        # keep maps in memory while they fit what the tiles leave: the fewer files, the less I/O
        resident_mb = max(0, int((budget - floor) / SAFETY / 3)) // 1024**2
        est = streaming(tile_mb, resident_mb)
        while est > budget and resident_mb > 0:
            resident_mb //= 2
            est = streaming(tile_mb, resident_mb)
        return MemoryPlan("streaming", gb(est), tile_mb=tile_mb, resident_mb=resident_mb, scratch=scratch)
    raise ValueError(
        f"{op} of shape {tuple(shape)} needs at least {gb(best):.2f} GB (streaming with the smallest tiles); "
        f"the budget is {memory_gb:.2f} GB. Raise memory_gb to {math.ceil(gb(best) * 100) / 100:.2f} "
        "or more, or use a lower-precision dtype"
    )


def _fewest_splits(model: nn.Module, op: str, shape: tuple[int, ...], budget: float, axis: int,
                   dtype: torch.dtype, argmax: bool = False) -> tuple[int, int]:
    """(the fewest num_splits whose estimate fits `budget` bytes, its estimate), else (the most splits, the
    smallest estimate seen)."""
    factor = model.config.downsample_factor
    max_len = shape[2 + axis] * (factor if op == "decode" else 1)
    best = None
    for k in _candidates(max_len):
        est = estimate_peak(model, op, shape, k, axis, dtype, argmax)
        if est <= budget:
            return k, est
        best = est if best is None else min(best, est)
    return max_len, best


def choose_splits(model: nn.Module, op: str, shape: tuple[int, ...], memory_gb: float, axis: int = 0,
                  dtype: torch.dtype = torch.float32) -> int:
    """The smallest num_splits whose estimated peak fits `memory_gb` (in-memory split only, no streaming);
    ValueError naming the minimum."""
    k, est = _fewest_splits(model, op, shape, memory_gb * GB, axis, dtype)
    if est <= memory_gb * GB:
        return k
    raise ValueError(
        f"{op} of shape {tuple(shape)} needs at least {est / GB:.2f} GB even with {k} splits along axis "
        f"{axis}; the budget is {memory_gb:.2f} GB. Raise memory_gb, use a lower-precision dtype, or pass "
        "sliding_window=True"
    )


def within(model: nn.Module, op: str, x: torch.Tensor, memory_gb: float | None, *, sliding_window: bool = False,
           roi_size: tuple[int, ...] | None = None, overlap: float = 0.25, split_axis: int | None = None,
           scratch: str | Path | None = None, plan: MemoryPlan | None = None, argmax: bool = False, **kw):
    """Run `model.encode`/`model.decode` with the fastest exact plan that fits `memory_gb` (see `plan_memory`),
    or with `plan` when given; `argmax` (decode only): class indices, see `Autoencoder.decode`.

    With `sliding_window=True` and a budget no exact plan can meet, fall back to MONAI's
    sliding_window_inference with Gaussian blending (approximate: seams are blended, not exact).
    """
    fn = model.encode if op == "encode" else model.decode
    if argmax:
        if op != "decode" or sliding_window:
            raise ValueError("argmax is for exact decodes: op='decode' without sliding_window")
        kw = {**kw, "argmax": True}
    axis = model.config.split_axis if split_axis is None else split_axis
    dtype = kw.get("dtype") or torch.float32
    with torch.no_grad():
        if plan is None:
            try:
                plan = plan_memory(model, op, tuple(x.shape), memory_gb, axis=axis, dtype=dtype, scratch=scratch,
                                   device=x.device, argmax=argmax)
            except ValueError:
                if not sliding_window:
                    raise
                return _sliding(model, op, x, memory_gb, roi_size, overlap, axis, kw)
        if plan.kind == "streaming":
            devices = tuple(torch.device(d) for d in kw.get("devices") or ())
            return fn(x, stream=plan.stream(dtype, devices), **({"argmax": True} if argmax else {}))
        return fn(x, num_splits=plan.num_splits, split_axis=plan.split_axis, **kw)


def _sliding(model, op, x, memory_gb, roi_size, overlap, axis, kw):
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
