"""Exact streaming encode/decode: the autoencoder layer by layer over 3D tiles, big maps out of core.

Every feature map lives in a `Store`: host memory when it is small enough, otherwise an unlinked scratch
file mapped into memory whose pages are handed back after each tile (so they never pile up in the
resident set; the page cache keeps them as long as the machine has room). Each convolution runs tile by
tile: an output tile reads only the input region its receptive field needs (the halo; zero padding only at
the volume's faces), applies the preceding GroupNorm (+SiLU) with the statistics of the *whole* tensor,
and is written back while its per-channel moments are merged (fp64, Chan's formula) into the output's
statistics. Nothing is approximated, so the result equals the unsplit computation in the same dtype; peak
memory is the tiles' working set plus the input and the output, whatever the volume size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import math
import mmap
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from maisi.networks.split import _CONV, _MODE, Conv, Moments, Plan, channel_moments, group_affine

Region = tuple[tuple[int, int], ...]  # [start, stop) per spatial axis
PAGE = mmap.PAGESIZE
TILE_EDGES = (256, 192, 160, 128, 112, 96, 80, 64, 56, 48, 40, 32, 24, 16, 12, 8, 4, 2, 1)


@dataclass
class StreamPlan:
    """How to stream one pass.

    `tile` fixes every conv's output-tile edge; None picks, per conv, the largest edge whose working set
    fits `tile_bytes`. Maps larger than `resident_bytes` go to unlinked files under `scratch` (a folder;
    None: the system temp folder); `scratch="memory"` keeps every map in host memory (a GPU box whose host
    RAM is plentiful). Tiles are computed on `devices` round-robin (default: the input's device).
    """

    tile: int | None = None
    tile_bytes: int = 512 * 1024**2
    resident_bytes: int = 256 * 1024**2
    scratch: str | Path | None = None
    dtype: torch.dtype = torch.float32
    devices: tuple[torch.device, ...] = ()
    channels_last: bool = True
    _params: Plan = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tile is not None and int(self.tile) < 1:
            raise ValueError(f"tile must be a positive voxel count, got {self.tile}")
        if self.tile_bytes <= 0 or self.resident_bytes < 0:
            raise ValueError(f"tile_bytes must be > 0 and resident_bytes >= 0, got {self.tile_bytes}, "
                             f"{self.resident_bytes}")
        if self.scratch not in (None, "memory") and not Path(self.scratch).is_dir():
            raise ValueError(f"scratch must be an existing folder or 'memory', got {str(self.scratch)!r}")
        self._params = Plan(1, 0, self.devices, self.dtype, self.channels_last)

    def param(self, p: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self._params.param(p, device)

    def device(self, i: int, default: torch.device) -> torch.device:
        return self._params.device(i, default)

    def store(self, channels: int, sizes: Sequence[int]) -> Store:
        nbytes = channels * math.prod(sizes) * _size(self.dtype)
        on_disk = self.scratch != "memory" and nbytes > self.resident_bytes
        return Store(channels, sizes, self.dtype, (self.scratch or tempfile.gettempdir()) if on_disk else None)

    def edge(self, cin: int, cout: int, stride: int, kernel: int, upsample: bool, residual: int = 0,
             nd: int = 3) -> int:
        """Output-tile edge of one conv: `tile`, or the largest edge whose working set fits `tile_bytes`."""
        if self.tile is not None:
            return int(self.tile)
        for t in TILE_EDGES:
            if tile_working_set(t, nd, cin, cout, stride, kernel, upsample, residual, self.dtype) <= self.tile_bytes:
                return t
        return 1


_HEAP_BOUNDED = False


def bound_heap(threshold: int = 4 * 1024**2) -> None:
    """Make glibc hand every freed allocation of `threshold` bytes or more back to the OS at once.

    glibc raises its mmap threshold after large frees, so tile-sized temporaries move onto the heap, and
    the small long-lived objects allocated between them (tile moments, Python objects) pin the freed space:
    the resident set then grows by about one tile per tile. A fixed M_MMAP_THRESHOLD keeps each big buffer
    in its own mapping. Process-wide, set once, only when a streaming pass runs; a no-op off glibc.
    """
    global _HEAP_BOUNDED
    if _HEAP_BOUNDED or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass
    _HEAP_BOUNDED = True


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tile_working_set(t: int, nd: int, cin: int, cout: int, stride: int, kernel: int, upsample: bool,
                     residual: int, dtype: torch.dtype) -> int:
    """Bytes one output tile of edge `t` holds at once (see `conv_tiled`), conservatively."""
    b = _size(dtype)
    e_in = ((t - 1) * stride + kernel) ** nd  # the padded input region
    src = ((t + 1) // 2 + 3) ** nd if upsample else e_in  # rows read from the store
    per_in = 4 + (4 if b != 4 else 0) + 2 * b  # fp32 normalised + fp32 cast, dtype cast + padded copy
    read = src * cin * b * (2 if upsample else 1) + (((t + 1) // 2 + 3) * 2) ** nd * cin * b * upsample
    out = t**nd * cout * (2 * b + 4)  # conv rows, the stored copy's statistics pass, oneDNN's reorder
    return read + e_in * cin * per_in + out + t**nd * (residual + cout) * b * (residual > 0)


class Store:
    """A 1×C×(sizes) feature map kept as (sizes..., C) in host memory or in an unlinked scratch file.

    Tiles are read and written by region; a file-backed store hands its mapped pages back to the page
    cache after every access (madvise DONTNEED), so only the tile in flight counts towards the process's
    memory. `moments` collects the per-channel statistics of what was written, for the next GroupNorm.
    """

    def __init__(self, channels: int, sizes: Sequence[int], dtype: torch.dtype, folder: str | Path | None):
        bound_heap()
        self.channels, self.sizes, self.dtype = int(channels), tuple(int(s) for s in sizes), dtype
        self.moments: list[Moments] = []
        self._file = self._map = None
        if folder is None:
            self.data = torch.empty(*self.sizes, self.channels, dtype=dtype)
        else:
            nbytes = self.channels * math.prod(self.sizes) * _size(dtype)
            self._file = tempfile.TemporaryFile(dir=folder, prefix="maisi-stream-")  # unlinked: gone on any exit
            try:
                os.posix_fallocate(self._file.fileno(), 0, nbytes)  # fail now, not mid-pass, when the disk is full
            except OSError as e:
                self._file.close()
                raise OSError(e.errno, f"streaming needs {nbytes / 1024**3:.2f} GB of scratch space in {folder} "
                                       f"({e.strerror}); free space there or pass another scratch folder") from e
            self._map = mmap.mmap(self._file.fileno(), nbytes)
            self.data = torch.frombuffer(self._map, dtype=dtype).view(*self.sizes, self.channels)
        self._row = self.data.stride(0) * _size(dtype)

    @classmethod
    def of(cls, x: torch.Tensor) -> Store:
        """A host-memory store holding sample `x` (1×C×...)."""
        s = cls(x.shape[1], x.shape[2:], x.dtype, None)
        s.data.copy_(x[0].movedim(0, -1))
        return s

    @property
    def on_disk(self) -> bool:
        return self._map is not None

    def read(self, region: Region, device: torch.device) -> torch.Tensor:
        """A dense 1×C×(region) copy (channels-last strides) on `device`."""
        view = self.data[tuple(slice(a, b) for a, b in region)]
        tile = torch.empty(view.shape, dtype=self.dtype).copy_(view)
        self._release(region)
        return tile.movedim(-1, 0)[None].to(device)

    def write(self, region: Region, tile: torch.Tensor) -> None:
        """Store 1×C×(region) `tile` and merge its per-channel moments into `moments`."""
        self.moments.append(tuple(m.cpu() if isinstance(m, torch.Tensor) else m for m in channel_moments(tile)))
        self.data[tuple(slice(a, b) for a, b in region)].copy_(tile[0].movedim(0, -1))
        self._release(region)

    def affine(self, norm: torch.nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """GroupNorm(this map) as scale, shift (1×C×1…), from the moments of every tile written."""
        if not self.moments:  # filled outside `write` (the caller's input): one pass over the rows
            for a, b in _chunks(self.sizes[0], 8):
                region = ((a, b),) + tuple((0, s) for s in self.sizes[1:])
                self.moments.append(channel_moments(self.read(region, torch.device("cpu"))))
        return group_affine(norm, self.moments, len(self.sizes) + 2)

    def tensor(self) -> torch.Tensor:
        """The whole map as 1×C×... (a view for host stores)."""
        return self.data.movedim(-1, 0)[None]

    def close(self) -> None:
        self.data = None
        if self._map is not None:
            self._map.close()
            self._file.close()
            self._map = self._file = None

    def _release(self, region: Region) -> None:
        if self._map is not None:
            start = region[0][0] * self._row // PAGE * PAGE
            stop = min(len(self._map), -(-region[0][1] * self._row // PAGE) * PAGE)
            if stop > start:
                self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)


class IndexStore:
    """Where a conv's output tiles end as their argmax over the channels (int64 class indices, X×Y×Z): the
    C-channel map is never held whole (a mask autoencoder's 125 class logits at 256³ are 8.4 GB in fp32)."""

    def __init__(self, sizes: Sequence[int]):
        self.sizes = tuple(int(s) for s in sizes)
        self.data = torch.empty(*self.sizes, dtype=torch.long)

    def write(self, region: Region, tile: torch.Tensor) -> None:
        self.data[tuple(slice(a, b) for a, b in region)].copy_(tile[0].argmax(0))

    def tensor(self) -> torch.Tensor:
        return self.data[None, None]

    def close(self) -> None:
        self.data = None


def _chunks(length: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def tiles(sizes: Sequence[int], edge: int) -> Iterator[Region]:
    """Output regions of edge `edge` (the last one per axis shorter) covering `sizes`, x outermost."""
    yield from itertools.product(*(_chunks(s, edge) for s in sizes))


def conv_tiled(src: Store, layer: Conv, plan: StreamPlan, *, pre: Callable | None = None, upsample: bool = False,
               residual: Callable[[Region, torch.device], torch.Tensor] | None = None, residual_channels: int = 0,
               out: Store | IndexStore | None = None, device: torch.device | None = None) -> Store | IndexStore:
    """conv(pad(pre(up(src)))) tile by tile into a new store (or `out`), equal to the unsplit result.

    `residual(region, device)` returns a tensor added to each output tile before it is stored.
    """
    k, s, (lo, _) = layer.kernel, layer.stride, layer.pad
    weight, bias = layer.conv.weight, layer.conv.bias
    nd = len(src.sizes)
    in_sizes = [2 * d if upsample else d for d in src.sizes]
    out_sizes = [layer.out_length(d) for d in in_sizes]
    out = out or plan.store(weight.shape[0], out_sizes)
    edge = plan.edge(src.channels, weight.shape[0], s, k, upsample, residual_channels, nd)
    device = device or torch.device("cpu")
    for i, region in enumerate(tiles(out_sizes, edge)):
        dev = plan.device(i, device)
        read, crop, pads = [], [], []
        for (o0, o1), length, src_len in zip(region, in_sizes, src.sizes):
            i0, i1 = o0 * s - lo, (o1 - 1) * s + k - lo  # input rows needed, in unpadded coordinates
            c0, c1 = max(i0, 0), min(i1, length)
            if upsample:  # trilinear ×2 (align_corners=False) reads one source row either side
                r0, r1 = max(0, c0 // 2 - 1), min(src_len, (c1 - 1) // 2 + 2)
                read.append((r0, r1))
                crop.append((c0 - 2 * r0, c1 - 2 * r0))
            else:
                read.append((c0, c1))
            pads.append((c0 - i0, i1 - c1))
        seg = src.read(tuple(read), dev)
        if upsample:
            seg = F.interpolate(seg.to(plan.dtype), scale_factor=2.0, mode=_MODE[nd])
            seg = seg[(slice(None), slice(None)) + tuple(slice(a, b) for a, b in crop)]
        if pre is not None:
            seg = pre(seg)
        seg = seg.to(plan.dtype)
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad order: last axis first
        if any(flat):
            seg = F.pad(seg, flat)
        if plan.channels_last and nd == 3:
            seg = seg.contiguous(memory_format=torch.channels_last_3d)
        y = _CONV[nd](seg, plan.param(weight, dev), plan.param(bias, dev), stride=s)
        del seg
        if residual is not None:
            y += residual(region, dev)
        out.write(region, y)
        del y
    return out
