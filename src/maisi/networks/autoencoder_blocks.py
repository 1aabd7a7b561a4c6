"""The autoencoder's building blocks (REFERENCE §1.1): ResBlock, Downsample, Upsample and the Coder cascade,
each with its plain (autograd), split (`run`) and streaming (`stream`) inference paths."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from maisi.config import AutoencoderConfig
from maisi.networks.split import _CONV, _MODE, Plan, SplitConv, _narrow, conv_split, norm_affine, norm_pre
from maisi.networks.stream import IndexStore, Store, StreamPlan, conv_tiled, tiles


class ResBlock(nn.Module):
    """GN → SiLU → conv3 → GN → SiLU → conv3, plus a 1×1 shortcut when the channel count changes."""

    def __init__(self, sd: int, cin: int, cout: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps)
        self.conv1 = SplitConv(sd, cin, cout, 3, pad=(1, 1))
        self.norm2 = nn.GroupNorm(groups, cout, eps)
        self.conv2 = SplitConv(sd, cout, cout, 3, pad=(1, 1))
        self.nin_shortcut = SplitConv(sd, cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h

    def run(self, x: torch.Tensor, plan: Plan, spare: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split inference; consumes `x` and returns (output, a dead buffer the next block may reuse).

        Memory: equal channels keep the hidden tensor in `spare` when it fits and add the residual in place;
        halving channels (decoder) writes hidden and shortcut rows back into `x`'s own memory one segment
        behind the conv that reads them, so no full-size tensor is allocated at all.
        """
        cin, cout, dim = x.shape[1], self.conv1.conv.conv.out_channels, plan.axis + 2
        pre1 = norm_pre(*norm_affine(self.norm1, x, plan), True, plan)
        if cin == cout:
            buf = spare if spare is not None and spare.shape == x.shape and spare.dtype == x.dtype else None
            h = conv_split(x, self.conv1.conv, plan, pre=pre1, out=buf)
            pre2 = norm_pre(*norm_affine(self.norm2, h, plan), True, plan)
            return conv_split(h, self.conv2.conv, plan, pre=pre2, out=x, add=True), h
        sc = self.nin_shortcut.conv.conv

        def shortcut(a: int, b: int) -> torch.Tensor:  # 1×1 conv of the rows [a, b) only
            w, bias = plan.param(sc.weight, x.device), plan.param(sc.bias, x.device)
            return _CONV[x.ndim - 2](x.narrow(dim, a, b - a), w, bias)

        if 2 * cout > cin:  # channels grow (encoder): fresh tensors
            h = conv_split(x, self.conv1.conv, plan, pre=pre1)
            pre2 = norm_pre(*norm_affine(self.norm2, h, plan), True, plan)
            return conv_split(h, self.conv2.conv, plan, pre=pre2, residual=shortcut), None
        h, res = x[:, :cout], x[:, cout : 2 * cout]
        pending: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

        def sink(a: int, b: int, rows: torch.Tensor) -> None:
            # a 3-tap conv reads at most one row of the previous segment, so writing one segment late is safe
            pending.append((a, b, rows, shortcut(a, b)))
            if len(pending) > 1 or b == x.shape[dim]:
                for a0, b0, hr, sr in pending[:-1] if b != x.shape[dim] else pending:
                    h.narrow(dim, a0, b0 - a0).copy_(hr)
                    res.narrow(dim, a0, b0 - a0).copy_(sr)
                del pending[: len(pending) - 1 if b != x.shape[dim] else len(pending)]

        conv_split(x, self.conv1.conv, plan, pre=pre1, sink=sink)
        pre2 = norm_pre(*norm_affine(self.norm2, h, plan), True, plan)
        return conv_split(h, self.conv2.conv, plan, pre=pre2, out=res, add=True), h

    def stream(self, x: Store, plan: StreamPlan, device: torch.device) -> Store:
        """Streaming inference (see networks.stream); consumes `x`."""
        h = conv_tiled(x, self.conv1.conv, plan, pre=norm_pre(*x.affine(self.norm1), True, plan), device=device)
        sc = None if isinstance(self.nin_shortcut, nn.Identity) else self.nin_shortcut.conv.conv

        def residual(region, dev: torch.device) -> torch.Tensor:
            rows = x.read(region, dev)
            return rows if sc is None else _CONV[rows.ndim - 2](rows, plan.param(sc.weight, dev), plan.param(sc.bias, dev))

        out = conv_tiled(h, self.conv2.conv, plan, pre=norm_pre(*h.affine(self.norm2), True, plan),
                         residual=residual, residual_channels=x.channels, device=device)
        h.close()
        x.close()
        return out


class Downsample(nn.Module):
    """Pad (0, 1) on every spatial axis, then a stride-2 3×3×3 conv."""

    def __init__(self, sd: int, c: int):
        super().__init__()
        self.conv = SplitConv(sd, c, c, 3, stride=2, pad=(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def run(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        return conv_split(x, self.conv.conv, plan)

    def stream(self, x: Store, plan: StreamPlan, device: torch.device) -> Store:
        y = conv_tiled(x, self.conv.conv, plan, device=device)
        x.close()
        return y


class _Held(nn.Module):
    """Holds a layer as `.conv` (MONAI's MaisiConvolution → Convolution → layer nesting of the weight keys)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.conv = layer


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_T_CLS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class Upsample(nn.Module):
    """×2 upsampling: (tri)linear then a 3×3×3 conv (fused per segment when split), or, with `transposed`
    (the mask autoencoder, REFERENCE §8), a 3×3×3 stride-2 transposed conv (padding 1, output padding 1).
    Both keep their weights at `conv.conv.conv.*`."""

    def __init__(self, sd: int, c: int, transposed: bool = False):
        super().__init__()
        self.transposed = transposed
        if transposed:
            self.conv = _Held(_Held(_CONV_T_CLS[sd](c, c, 3, stride=2, padding=1, output_padding=1)))
        else:
            self.conv = SplitConv(sd, c, c, 3, pad=(1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return self.conv.conv.conv(x)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode=_MODE[x.ndim - 2]))

    def _transposed(self, seg: torch.Tensor, param: Callable[[torch.Tensor, torch.device], torch.Tensor]) -> torch.Tensor:
        layer = self.conv.conv.conv
        return _CONV_T[seg.ndim - 2](seg, param(layer.weight, seg.device), param(layer.bias, seg.device),
                                     stride=2, padding=1, output_padding=1)

    def run(self, x: torch.Tensor, plan: Plan) -> torch.Tensor:
        if not self.transposed:
            return conv_split(x, self.conv.conv, plan, upsample=True)
        # output rows [2a, 2b) read input rows [a, b] only (o = 2i + k - 1, k in 0..2): exact per segment
        dim, length = plan.axis + 2, x.shape[plan.axis + 2]
        fmt = torch.channels_last_3d if plan._cl(x) else torch.contiguous_format
        out = torch.empty(x.shape[0], x.shape[1], *(2 * d for d in x.shape[2:]), dtype=plan.dtype, device=x.device,
                          memory_format=fmt)
        for i, (a, b) in enumerate(plan.segments(length)):
            seg = x.narrow(dim, a, min(b + 1, length) - a).to(plan.device(i, x.device), plan.dtype)
            if plan._cl(seg):
                seg = seg.contiguous(memory_format=torch.channels_last_3d)
            y = self._transposed(seg, plan.param)
            out.narrow(dim, 2 * a, 2 * (b - a)).copy_(y.narrow(dim, 0, 2 * (b - a)))
        return out

    def stream(self, x: Store, plan: StreamPlan, device: torch.device) -> Store:
        if not self.transposed:
            y = conv_tiled(x, self.conv.conv, plan, upsample=True, device=device)
            x.close()
            return y
        c, nd = x.channels, len(x.sizes)
        out = plan.store(c, [2 * d for d in x.sizes])
        edge = max(1, plan.edge(c, c, 1, 3, True, 0, nd) // 2)  # input tiles: the output tile is twice as wide
        for i, region in enumerate(tiles(x.sizes, edge)):
            seg = x.read(tuple((a, min(b + 1, n)) for (a, b), n in zip(region, x.sizes)), plan.device(i, device))
            y = self._transposed(seg.to(plan.dtype), plan.param)
            out.write(tuple((2 * a, 2 * b) for a, b in region),
                      y[(slice(None), slice(None)) + tuple(slice(0, 2 * (b - a)) for a, b in region)])
        x.close()
        return out


def argmax_split(x: torch.Tensor, layer, plan: Plan, pre: Callable | None) -> torch.Tensor:
    """argmax over the channels of conv_split(x, layer), one segment at a time (N×1×... int64)."""
    dim = plan.axis + 2
    out = torch.empty(x.shape[0], 1, *(layer.out_length(d) for d in x.shape[2:]), dtype=torch.long, device=x.device)

    def keep(a: int, b: int, rows: torch.Tensor) -> None:
        _narrow(out, dim, a, b).copy_(rows.argmax(1, keepdim=True))

    conv_split(x, layer, plan, pre=pre, sink=keep)
    return out


class Coder(nn.Module):
    """A cascade of blocks (`blocks.{i}`, MONAI's MaisiEncoder/MaisiDecoder numbering)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def run(self, x: torch.Tensor, plan: Plan, argmax: bool = False) -> torch.Tensor:
        """Split inference: a GroupNorm is folded into the conv that follows it (no SiLU there). With `argmax`,
        the last conv's segments are reduced to their argmax over the channels as they come (N×1×... int64)."""
        pre, spare, last = None, None, len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if isinstance(block, nn.GroupNorm):
                pre = norm_pre(*norm_affine(block, x, plan), False, plan)
            elif isinstance(block, SplitConv) and argmax and i == last:
                return argmax_split(x, block.conv, plan, pre)
            elif isinstance(block, SplitConv):
                x, pre = conv_split(x, block.conv, plan, pre=pre), None
            elif isinstance(block, ResBlock):
                x, spare = block.run(x, plan, spare)
            else:
                x, spare = block.run(x, plan), None
        return x

    def stream(self, x: torch.Tensor, plan: StreamPlan, argmax: bool = False) -> torch.Tensor:
        """Streaming inference of one sample (1×C×...): every map in a Store, every conv tile by tile; with
        `argmax`, the last conv's tiles are kept as their argmax over the channels (1×1×... int64)."""
        device, last = x.device, len(self.blocks) - 1
        store, pre = Store.of(x.to(plan.dtype)), None
        for i, block in enumerate(self.blocks):
            if isinstance(block, nn.GroupNorm):
                pre = norm_pre(*store.affine(block), False, plan)
            elif isinstance(block, SplitConv):
                layer = block.conv
                out = None
                if i == last:  # the result stays in memory
                    sizes = [layer.out_length(d) for d in store.sizes]
                    out = IndexStore(sizes) if argmax else Store(layer.conv.out_channels, sizes, plan.dtype, None)
                y = conv_tiled(store, layer, plan, pre=pre, out=out, device=device)
                store.close()
                store, pre = y, None
            else:
                store = block.stream(store, plan, device)
        return store.tensor().to(device)


def encoder(c: AutoencoderConfig) -> Coder:
    sd, g, eps = c.spatial_dims, c.norm_num_groups, c.norm_eps
    blocks: list[nn.Module] = [SplitConv(sd, c.in_channels, c.channels[0], 3, pad=(1, 1))]
    prev = c.channels[0]
    for i, ch in enumerate(c.channels):
        for _ in range(c.num_res_blocks[i]):
            blocks.append(ResBlock(sd, prev, ch, g, eps))
            prev = ch
        if i < len(c.channels) - 1:
            blocks.append(Downsample(sd, prev))
    blocks += [nn.GroupNorm(g, prev, eps), SplitConv(sd, prev, c.latent_channels, 3, pad=(1, 1))]
    return Coder(blocks)


def decoder(c: AutoencoderConfig) -> Coder:
    sd, g, eps = c.spatial_dims, c.norm_num_groups, c.norm_eps
    chans, nres = list(reversed(c.channels)), list(reversed(c.num_res_blocks))
    blocks: list[nn.Module] = [SplitConv(sd, c.latent_channels, chans[0], 3, pad=(1, 1))]
    prev = chans[0]
    for i, ch in enumerate(chans):
        for _ in range(nres[i]):
            blocks.append(ResBlock(sd, prev, ch, g, eps))
            prev = ch
        if i < len(chans) - 1:
            blocks.append(Upsample(sd, prev, transposed=c.upsample_mode == "transposed_conv"))
    blocks += [nn.GroupNorm(g, prev, eps), SplitConv(sd, prev, c.out_channels, 3, pad=(1, 1))]
    return Coder(blocks)
