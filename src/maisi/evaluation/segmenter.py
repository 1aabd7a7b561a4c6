"""Segmenters for mask–image consistency: a small MONAI UNet trained on phantoms, or a user's TorchScript model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet, UNet
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import (
    Compose,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleIntensity,
    RandShiftIntensity,
    RandSimulateLowResolution,
    RandSpatialCrop,
    ScaleIntensityRange,
)
from monai.utils import convert_to_tensor
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from maisi.data.phantom import Phantom, make_phantom
from maisi.data.regions import parse_span, span_centre
from maisi.io.atomic import atomic_path
from maisi.labels import HU_RANGE

# A segmenter maps an X×Y×Z HU tensor (optionally with its voxel spacing, keyword `spacing`) to an integer
# X×Y×Z map of MAISI label ids.
Segmenter = Callable[..., torch.Tensor]

# Organs the phantom segmenter learns (others are background): liver, spleen, pancreas, kidneys, aorta, stomach,
# brain, the five lung lobes, heart, a few vertebrae levels are too small at coarse spacing and are left out.
PHANTOM_LABELS: tuple[int, ...] = (1, 3, 4, 5, 6, 12, 14, 22, 28, 29, 30, 31, 32, 115, 120)
# Training regions, in turn: the four and the spans `maisi generate` offers, so every junction is seen often.
REGIONS = ("head_neck", "chest", "abdomen", "pelvis", "head_neck-chest", "chest-abdomen", "abdomen-pelvis")
# MONAI UNet (residual units): on phantoms it fits within a few hundred steps where the BasicUNet of the first
# version (LEGACY_FEATURES) was still near chance, leaving most organs at Dice 0. Twice the widths of the first
# UNet (16/32/64/128), with more phantoms and steps, raised held-out Dice from 0.847 to 0.870 (benchmarks/segmenter.py).
CHANNELS = (32, 64, 128, 256)
STRIDES = (2, 2, 2)
LEGACY_FEATURES = (8, 16, 32, 32, 64, 8)  # the BasicUNet of files without "network" metadata
DIVISOR = 16  # inputs are padded to a multiple of this (the UNet needs 8, legacy BasicUNet files 16)
# Input channels: HU windows each scaled to [0, 1]. The wide one sees air, lung and bone; the soft-tissue one
# separates organs that differ by tens of HU (liver 98, spleen 108, pancreas 88, kidney 165), which in the
# wide window alone are ~0.01 apart, under the phantom's noise.
WINDOWS: tuple[tuple[float, float], ...] = (HU_RANGE, (-160.0, 240.0))
LEGACY_WINDOWS: tuple[tuple[float, float], ...] = (HU_RANGE,)  # files written before the windows
CONTEXT = 1.5  # training phantoms span CONTEXT × the crop per axis, so organs are seen at every position


def _channels(hu: torch.Tensor, windows: Sequence[Sequence[float]] = WINDOWS) -> torch.Tensor:
    """C×X×Y×Z network input of an X×Y×Z HU volume: one channel per HU window, scaled to [0, 1]."""
    hu = convert_to_tensor(hu, dtype=torch.float32, track_meta=False)
    return torch.stack([convert_to_tensor(ScaleIntensityRange(a, b, 0.0, 1.0, clip=True)(hu), track_meta=False)
                        for a, b in windows])


def _pad_to(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    shape = x.shape[-3:]
    pad = []
    for n in reversed(shape):
        pad += [0, (-n) % divisor]
    return F.pad(x, pad), tuple(shape)


class PhantomSegmenter:
    """A trained network plus its label ids, training spacing and HU windows; call it on an X×Y×Z HU tensor."""

    def __init__(self, net: torch.nn.Module, labels: Sequence[int], spacing: Sequence[float], info: dict | None = None,
                 windows: Sequence[Sequence[float]] = WINDOWS):
        self.net = net.eval()
        self.labels = tuple(int(v) for v in labels)
        self.spacing = tuple(float(s) for s in spacing)
        self.info = dict(info or {})
        self.windows = tuple((float(a), float(b)) for a, b in windows)

    @torch.no_grad()
    def __call__(self, hu: torch.Tensor | np.ndarray, spacing: Sequence[float] | None = None) -> torch.Tensor:
        hu = torch.as_tensor(np.asarray(hu, np.float32) if not isinstance(hu, torch.Tensor) else hu)
        if hu.ndim != 3:
            raise ValueError(f"segmenter input must be an X×Y×Z HU volume, got shape {tuple(hu.shape)}")
        device = next((q.device for q in self.net.parameters()), torch.device("cpu"))
        x = _channels(hu, self.windows)[None].to(device)
        shape = tuple(hu.shape)
        if spacing is not None:  # resample to the training spacing, predict, resample back (nearest)
            size = [max(DIVISOR, round(n * s / t)) for n, s, t in zip(shape, spacing, self.spacing)]
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        x, inner = _pad_to(x, DIVISOR)
        roi = self.info.get("size") if self.info.get("context") else None  # trained on crops of this size
        if roi is not None:  # windows like the training crops (instance norm statistics as in training)
            logits = sliding_window_inference(x, list(roi), 4, self.net, overlap=0.5, mode="gaussian")
        else:
            logits = self.net(x)
        logits = logits[..., : inner[0], : inner[1], : inner[2]]
        if logits.shape[2:] != shape:
            logits = F.interpolate(logits, size=shape, mode="trilinear", align_corners=False)
        lut = torch.tensor((0, *self.labels), dtype=torch.long)
        return lut[logits.argmax(1)[0].cpu()]


def valid_widths(channels: object) -> bool:
    """Whether `channels` are the UNet's widths: one positive int per level (len(STRIDES) + 1)."""
    return (isinstance(channels, (list, tuple)) and len(channels) == len(STRIDES) + 1
            and all(isinstance(c, int) and c > 0 for c in channels))


def _net(n_classes: int, in_channels: int = len(WINDOWS), channels: Sequence[int] = CHANNELS) -> UNet:
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=n_classes, channels=tuple(channels),
                strides=STRIDES, num_res_units=1)


@dataclass(frozen=True)
class Degradation:
    """How often each random degradation of a training crop is drawn (independently, each a probability)."""

    low_resolution: float = 0.25  # a coarser acquisition: nearest-neighbour zoom 0.5–1, trilinear back
    blur: float = 0.3  # Gaussian blur, σ 0.5–1.5 voxels per axis (edges replicated, so no dark border)
    noise: float = 0.3  # extra Gaussian noise, σ up to 20 HU
    gain: float = 0.3  # calibration gain, ±5 %
    offset: float = 0.3  # calibration offset, ±25 HU


BLUR_MARGIN = 5  # voxels replicated around a crop before blurring: ≥ 3σ of the widest blur


def image_augmentation(seed: int, degradation: Degradation = Degradation()) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random image degradations of a 1×X×Y×Z HU crop, applied before windowing as nnU-Net's defaults do, so that
    the segmenter judges anatomy rather than one scanner's sharpness and noise. A generated or VAE-decoded CT is
    smoother than the phantoms it was trained on, and a segmenter that only saw sharp phantoms misreads the blur.
    The seed fixes the sequence of draws."""
    d = degradation
    low = RandSimulateLowResolution(prob=d.low_resolution, zoom_range=(0.5, 1.0))
    blur = RandGaussianSmooth(sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), sigma_z=(0.5, 1.5), prob=d.blur)
    rest = Compose([RandGaussianNoise(prob=d.noise, std=20.0), RandScaleIntensity(factors=0.05, prob=d.gain),
                    RandShiftIntensity(offsets=25.0, prob=d.offset)])
    for k, t in enumerate((low, blur, rest)):
        t.set_random_state(seed=seed + k)

    def degrade(hu: torch.Tensor) -> torch.Tensor:
        hu = convert_to_tensor(low(hu), track_meta=False)
        m = BLUR_MARGIN  # MONAI's filter pads with zeros, which in HU is a water-bright rim
        padded = F.pad(hu[None], (m,) * 6, mode="replicate")[0]
        hu = convert_to_tensor(blur(padded), track_meta=False)[:, m:-m, m:-m, m:-m]
        return convert_to_tensor(rest(hu), track_meta=False)

    return degrade


def _legacy_net(n_classes: int) -> BasicUNet:
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=n_classes, features=LEGACY_FEATURES)


def _compact(label: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    lut = np.zeros(256, np.int64)
    for i, v in enumerate(labels, start=1):
        lut[v] = i
    return lut[label.astype(np.int64)]


def phantom_pool(n: int, size: Sequence[int], spacing: Sequence[float], seed: int,
                 regions: Sequence[str] = REGIONS, exclusive: bool = True) -> list[Phantom]:
    return [make_phantom(regions[i % len(regions)], size=size, spacing=spacing, seed=seed + i, exclusive=exclusive)
            for i in range(n)]


def train_phantom_segmenter(out_path: str | Path, steps: int = 2000, *, size: Sequence[int] = (48, 48, 48),
                            spacing: Sequence[float] = (4.0, 4.0, 4.0), n_phantoms: int = 128, batch: int = 2,
                            lr: float = 3e-3, seed: int = 0, labels: Sequence[int] = PHANTOM_LABELS,
                            context: float = CONTEXT, regions: Sequence[str] = REGIONS,
                            augment: bool = True, channels: Sequence[int] = CHANNELS,
                            device: str | torch.device = "cpu",
                            log: Callable[[str], None] | None = None) -> PhantomSegmenter:
    """Train a small UNet for `steps` Adam steps (linear warm-up, then cosine decay) with Dice+CE on random
    `size` crops of `n_phantoms` phantoms (seeds seed.., `regions` in turn, leaving out spans the field of view
    cannot show) whose field of view is `context` × the crop, and save it to out_path (safetensors, settings in
    its metadata). Returns the segmenter. With `augment`, each crop is degraded at random first
    (`image_augmentation`); `channels` are the UNet's four widths.

    The defaults are sized for held-out Dice, not speed (~25 min on one core; benchmarks/segmenter.py): with
    16 phantoms and 300 steps, spleen, pancreas and stomach stayed at Dice 0 on held-out phantoms.

    The phantoms keep every organ's label (exclusive=False: a chest phantom's liver dome is liver, not body), so
    each label means one look; the crops put organs anywhere in the network's input, so it learns their look
    rather than where a region-centred field of view puts them."""
    if steps < 1 or n_phantoms < 1 or batch < 1:
        raise ValueError("steps, n_phantoms and batch must be >= 1")
    if any(n % DIVISOR for n in size):
        raise ValueError(f"size must be a multiple of {DIVISOR} per axis, got {list(size)}")
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if not valid_widths(channels):
        raise ValueError(f"channels must be {len(STRIDES) + 1} positive widths, got {list(channels)}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    full = [int(round(n * context)) for n in size]
    # spans whose marker organs do not both fit in the field of view are left out
    fov_z = full[2] * spacing[2]
    regions = [r for r in regions if span_centre(*parse_span(r))[1] <= fov_z]
    if not regions:
        raise ValueError(f"no training region fits a {fov_z:.0f} mm field of view; use a larger size or context")
    pool = phantom_pool(n_phantoms, full, spacing, seed, regions, exclusive=False)
    # HU image and compact label in one tensor, so that one random crop cuts both alike
    vols = [torch.stack([torch.from_numpy(p.image).float(), torch.from_numpy(_compact(p.label, labels)).float()])
            for p in pool]
    crop = RandSpatialCrop(roi_size=list(size), random_size=False)
    crop.set_random_state(seed=seed)
    degrade = image_augmentation(seed) if augment else None

    def sample(i: int) -> torch.Tensor:  # network channels and label of one random crop
        hu, lab = convert_to_tensor(crop(vols[i]), track_meta=False)
        if degrade is not None:
            hu = degrade(hu[None])[0]
        return torch.cat([_channels(hu), lab[None]])

    net = _net(len(labels) + 1, channels=channels).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = WarmupCosineSchedule(opt, warmup_steps=max(1, steps // 20), t_total=steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    start, loss = time.time(), torch.tensor(0.0)
    net.train()
    for step in range(1, steps + 1):
        idx = rng.choice(len(pool), size=min(batch, len(pool)), replace=False)
        xy = torch.stack([sample(i) for i in idx]).to(device)
        loss = loss_fn(net(xy[:, :-1]), xy[:, -1:].round().long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 25 == 0 or step == steps):
            log(f"step {step}/{steps}  loss {loss.item():.4f}  ({time.time() - start:.0f} s)")
    info = {"steps": steps, "final_loss": round(float(loss.item()), 5), "n_phantoms": n_phantoms,
            "size": list(size), "context": context, "seed": seed, "batch": batch, "lr": lr, "regions": list(regions),
            "augment": augment, "channels": [int(c) for c in channels]}
    seg = PhantomSegmenter(net.cpu().eval(), labels, spacing, info)
    save_segmenter(seg, out_path)
    return seg


def save_segmenter(seg: PhantomSegmenter, path: str | Path) -> Path:
    meta = {"kind": "maisi-phantom-segmenter", "labels": json.dumps(list(seg.labels)),
            "spacing": json.dumps(list(seg.spacing)),
            "network": json.dumps({"name": "UNet", "channels": [int(c) for c in seg.net.channels],
                                   "strides": list(STRIDES), "num_res_units": 1}),
            "windows": json.dumps([list(w) for w in seg.windows]),
            "info": json.dumps(seg.info)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in seg.net.state_dict().items()}, str(tmp), metadata=meta)
    return Path(path)


def load_segmenter(path: str | Path) -> Segmenter:
    """A phantom segmenter (.safetensors written by train_phantom_segmenter) or a TorchScript model called
    on a 1×1×X×Y×Z HU tensor that returns 1×C×X×Y×Z logits (channel c = label id c) or an X×Y×Z label map."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no segmenter at {path}; train one with `maisi evaluate train-segmenter`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        meta = None
    if meta is not None:
        if meta.get("kind") != "maisi-phantom-segmenter":
            raise ValueError(f"{path}: a safetensors file but not a maisi phantom segmenter")
        labels = json.loads(meta["labels"])
        if "network" in meta:
            network = json.loads(meta["network"])
            channels = network.pop("channels", None)
            if network != {"name": "UNet", "strides": list(STRIDES), "num_res_units": 1} or not valid_widths(channels):
                raise ValueError(f"{path}: segmenter network {meta['network']} is not a MONAI UNet with strides "
                                 f"{list(STRIDES)}, one residual unit and {len(STRIDES) + 1} positive channel widths")
            windows = json.loads(meta["windows"])
            net = _net(len(labels) + 1, len(windows), channels)
        else:  # written by the first version: a one-channel BasicUNet
            if tuple(json.loads(meta.get("features", "[]"))) != LEGACY_FEATURES:
                raise ValueError(f"{path}: segmenter features {meta.get('features')} differ from "
                                 f"{list(LEGACY_FEATURES)}")
            windows = LEGACY_WINDOWS
            net = _legacy_net(len(labels) + 1)
        net.load_state_dict(load_file(str(path)))
        return PhantomSegmenter(net, labels, json.loads(meta["spacing"]), json.loads(meta.get("info", "{}")), windows)
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: neither a maisi phantom segmenter nor a TorchScript model") from e

    @torch.no_grad()
    def segment(hu: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
        out = module(torch.as_tensor(hu).float()[None, None])
        out = out.argmax(1)[0] if out.is_floating_point() else out.reshape(tuple(hu.shape))
        if tuple(out.shape) != tuple(hu.shape):
            raise ValueError(f"{path}: segmenter returned shape {tuple(out.shape)} for a {tuple(hu.shape)} volume")
        return out.long()

    return segment
