"""Exact tensor splitting (TSP): convolutions and GroupNorm computed segment by segment along one axis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


class Conv(nn.Module):
    """A convolution held as `.conv` (so weights sit at `...conv.weight`, MONAI's `Convolution` layout).

    `pad` is (before, after) zero padding on every spatial axis; (0, 1) with stride 2 is MAISI's downsample.
    """

    def __init__(self, spatial_dims: int, cin: int, cout: int, kernel: int, stride: int = 1, pad: tuple[int, int] = (0, 0)):
        super().__init__()
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.conv = conv_cls(cin, cout, kernel, stride=stride, padding=0)
        self.kernel, self.stride, self.pad = kernel, stride, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain (autograd) path."""
        lo, hi = self.pad
        if lo != hi:
            x, lo = F.pad(x, self.pad * (x.ndim - 2)), 0
        return _CONV[x.ndim - 2](x, self.conv.weight, self.conv.bias, stride=self.stride, padding=lo)

    def out_length(self, length: int) -> int:
        return (length + sum(self.pad) - self.kernel) // self.stride + 1


class SplitConv(nn.Module):
    """MONAI `MaisiConvolution` layout: weights at `...conv.conv.weight`."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, kernel: int, stride: int = 1, pad: tuple[int, int] = (0, 0)):
        super().__init__()
        self.conv = Conv(spatial_dims, cin, cout, kernel, stride, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@dataclass
class Plan:
    """How to run one inference pass: segments along spatial `axis`, devices used round-robin, compute dtype."""

    num_splits: int = 1
    axis: int = 0
    devices: tuple[torch.device, ...] = ()
    dtype: torch.dtype = torch.float32
    channels_last: bool = False  # 3D only: keep activations and weights in channels_last_3d (faster oneDNN convs)
    _cache: dict = field(default_factory=dict, repr=False)

    def device(self, i: int, default: torch.device) -> torch.device:
        return self.devices[i % len(self.devices)] if self.devices else default

    def param(self, p: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`p` on `device` in `dtype` (compute dtype by default), converted once per pass."""
        dtype = dtype or self.dtype
        key = (id(p), device, dtype)
        if key not in self._cache:
            q = p.detach().to(device=device, dtype=dtype)
            self._cache[key] = q.contiguous(memory_format=torch.channels_last_3d) if self._cl(q) else q
        return self._cache[key]

    def _cl(self, t: torch.Tensor) -> bool:
        return self.channels_last and t.ndim == 5

    def segments(self, length: int) -> list[tuple[int, int]]:
        """[start, stop) ranges covering 0..length, sizes differing by at most one; never empty."""
        n = max(1, min(self.num_splits, length))
        bounds = [length * i // n for i in range(n + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(n)]


def _narrow(x: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    return x.narrow(dim, start, stop - start)


def norm_affine(norm: nn.GroupNorm, x: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) scale and shift so that GroupNorm(x) == x * scale + shift.

    Statistics are exact over the whole tensor: each segment's per-channel mean and M2 (channel_moments), merged
    into groups in fp64 with Chan's parallel formula, so nothing full-size is copied.
    """
    dim = plan.axis + 2
    parts = [channel_moments(_narrow(x, dim, a, b)) for a, b in plan.segments(x.shape[dim])]
    return group_affine(norm, parts, x.ndim)


Moments = tuple[int, torch.Tensor, torch.Tensor]  # (voxels per channel, mean N×C fp64, sum of squares N×C fp64)


def channel_moments(seg: torch.Tensor) -> Moments:
    """Per-(sample, channel) count, mean and M2 of one piece of a tensor (fp32 pass, fp64 result).

    Shifted sums over cache-sized chunks: each chunk's sum and sum of squares of (x − K), K a first estimate of the
    mean, in fp32, accumulated in fp64. With the shift the squares do not cancel, and each chunk is small enough
    that its fp32 sums stay exact to ~1e-8 relative (checked against fp64: more exact than torch.var_mean's
    Welford), at a tenth of var_mean's time on a channels-last map. Nothing segment-sized is allocated.
    """
    n, c = seg.shape[:2]
    # rows of channels: N×S×C when channels are innermost (channels_last), else N×C×S
    last = c > 1 and seg.stride(1) == 1
    rows = seg.movedim(1, -1) if last else seg
    span = 2 if not last else 1  # the first spatial dim, where chunks are cut
    length = rows.shape[span]
    per_row = max(1, rows[0].numel() // max(1, length))
    step = max(1, (_CHUNK if seg.device.type == "cpu" else _CHUNK_GPU) // per_row)
    red = 1 if last else 2

    def flat(a: int, b: int) -> torch.Tensor:
        piece = rows.narrow(span, a, b - a).float()  # a bf16 map is cast a chunk at a time
        return piece.reshape(n, -1, c) if last else piece.reshape(n, c, -1)

    shift = flat(0, min(length, step)).mean(red, keepdim=True)
    s1 = torch.zeros(n, c, dtype=torch.float64, device=seg.device)
    s2 = torch.zeros(n, c, dtype=torch.float64, device=seg.device)
    for a in range(0, length, step):
        d = flat(a, min(length, a + step)) - shift
        s1 += d.sum(red)
        s2 += d.square_().sum(red)
    cnt = seg[0, 0].numel()
    mean = s1 / cnt
    return cnt, mean + shift.reshape(n, c).double(), s2 - s1 * mean


_CHUNK = 1 << 18  # elements per chunk of channel_moments on a CPU (1 MB of fp32: cache-sized)
_CHUNK_GPU = 1 << 24  # on a GPU (64 MB of fp32): few kernel launches; small against any GPU budget


def group_affine(norm: nn.GroupNorm, parts: list[Moments], ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm as a per-(sample, channel) affine map from the moments of disjoint pieces (Chan's merge)."""
    n, c = parts[0][1].shape
    g, rep = norm.num_groups, c // norm.num_groups
    device = parts[0][1].device
    cnt = torch.tensor([p[0] for p in parts], dtype=torch.float64, device=device).view(-1, 1, 1, 1)  # S,1,1,1
    mean_p = torch.stack([p[1] for p in parts]).view(-1, n, g, rep)  # S,N,G,rep: one part per (piece, channel)
    m2_p = torch.stack([p[2] for p in parts]).view(-1, n, g, rep)
    total = cnt.sum() * rep
    mean = (cnt * mean_p).sum((0, 3)) / total  # N,G
    m2 = (m2_p + cnt * (mean_p - mean.view(1, n, g, 1)).square()).sum((0, 3))
    rstd = (m2 / total + norm.eps).rsqrt()
    mean_c = mean.repeat_interleave(rep, dim=1)
    rstd_c = rstd.repeat_interleave(rep, dim=1)
    w = norm.weight.detach().double().to(device) if norm.affine else torch.ones(c, dtype=torch.float64, device=device)
    b = norm.bias.detach().double().to(device) if norm.affine else torch.zeros(c, dtype=torch.float64, device=device)
    scale = rstd_c * w
    shift = b - mean_c * scale
    shape = (n, c) + (1,) * (ndim - 2)
    return scale.float().view(shape), shift.float().view(shape)


def norm_pre(scale: torch.Tensor, shift: torch.Tensor, silu: bool, plan: Plan) -> Callable:
    """Segment function applying a GroupNorm (precomputed affine) and optionally SiLU, in fp32."""

    def pre(seg: torch.Tensor) -> torch.Tensor:
        dev = seg.device
        y = torch.addcmul(shift.to(dev), seg.float(), scale.to(dev))
        if silu:
            F.silu(y, inplace=True)
        return y

    return pre


def conv_split(
    x: torch.Tensor,
    layer: Conv,
    plan: Plan,
    *,
    pre: Callable | None = None,
    upsample: bool = False,
    out: torch.Tensor | None = None,
    add: bool = False,
    residual: Callable | None = None,
    sink: Callable | None = None,
) -> torch.Tensor | None:
    """conv(pad(pre(up(x)))) computed segment by segment along `plan.axis`, equal to the unsplit result.

    Each output segment reads only the input rows its receptive field needs (the halo), so segments of
    any length (even shorter than the halo) and any number of splits give the same stitched output.
    `upsample` fuses ×2 (bi/tri)linear upsampling (align_corners=False) with the conv.
    The result is written into `out` (allocated when None; added to it when `add`); `residual(a, b)`
    returns a tensor added to output rows [a, b) before they are written (it may read `out`'s memory).
    With `sink`, each segment's rows go to `sink(a, b, rows)` instead and nothing is allocated.
    """
    k, s, (lo, hi) = layer.kernel, layer.stride, layer.pad
    w, bias = layer.conv.weight, layer.conv.bias
    nd, dim = x.ndim - 2, plan.axis + 2
    in_sizes = [2 * d if upsample else d for d in x.shape[2:]]
    out_sizes = [layer.out_length(d) for d in in_sizes]
    if out is None and sink is None:
        fmt = torch.channels_last_3d if plan._cl(x) else torch.contiguous_format
        out = torch.empty(x.shape[0], w.shape[0], *out_sizes, dtype=plan.dtype, device=x.device, memory_format=fmt)
    length = in_sizes[plan.axis]
    for i, (o0, o1) in enumerate(plan.segments(out_sizes[plan.axis])):
        dev = plan.device(i, x.device)
        i0, i1 = o0 * s - lo, (o1 - 1) * s + k - lo  # input rows needed, in unpadded coordinates
        c0, c1 = max(i0, 0), min(i1, length)
        if upsample:
            r0, r1 = max(0, c0 // 2 - 1), min(x.shape[dim], (c1 - 1) // 2 + 2)
            src = _narrow(x, dim, r0, r1).to(dev)
            seg = F.interpolate(src.to(plan.dtype), scale_factor=2.0, mode=_MODE[nd])
            seg = _narrow(seg, dim, c0 - 2 * r0, c1 - 2 * r0)
        else:
            seg = _narrow(x, dim, c0, c1).to(dev)
        if pre is not None:
            seg = pre(seg)
        seg = seg.to(plan.dtype)
        # symmetric padding of the other axes is left to the conv; the split axis is padded only at its ends
        sym = lo == hi
        pads = []
        for ax in reversed(range(nd)):  # F.pad order: last axis first
            pads += [c0 - i0, i1 - c1] if ax == plan.axis else ([0, 0] if sym else [lo, hi])
        if any(pads):
            seg = F.pad(seg, pads)
        if plan._cl(seg):
            seg = seg.contiguous(memory_format=torch.channels_last_3d)
        conv_pad = tuple(0 if (ax == plan.axis or not sym) else lo for ax in range(nd))
        y = _CONV[nd](seg, plan.param(w, dev), plan.param(bias, dev), stride=s, padding=conv_pad)
        del seg
        y = y.to(x.device)
        if sink is not None:
            sink(o0, o1, y)
            continue
        target = _narrow(out, dim, o0, o1)
        if residual is not None:
            y += residual(o0, o1)
        if add:
            target += y
        else:
            target.copy_(y)
        del y
    return out
