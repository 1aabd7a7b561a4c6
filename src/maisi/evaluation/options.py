"""What each evaluation takes (frozen option dataclasses) and gives back (a Report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maisi.device import pick_device
from maisi.evaluation.errors import OptionError
from maisi.evaluation.fid import FIDSettings

Source = str | Path  # a folder of NIfTI files (images/labels told apart by _label/_mask/_seg), a datalist .json or one file
DEFAULT_OUT = "evaluation"


def _check_device(device: str) -> None:
    try:
        pick_device(device)
    except ValueError as e:
        raise OptionError(f"bad {{device}}: {e}", "device") from None


@dataclass(frozen=True)
class FIDOptions:
    """2.5D FID between two sets of volumes."""

    real: Source
    fake: Source
    out: Source = DEFAULT_OUT  # report folder
    extractor: str = "efficientnet-lite0"  # or radimagenet:PATH, torchscript:PATH; FIDs of different ones differ
    settings: FIDSettings = field(default_factory=FIDSettings)  # preprocessing, the same for both sets
    cache: Source | bool = True  # feature cache folder; True: <out>/feature_cache, False: no cache
    device: str = "cpu"  # torch device of the 2D network
    key: str | None = None  # datalist list to read (default: testing, validation or training)

    def __post_init__(self):
        _check_device(self.device)

    def cache_dir(self) -> Path | None:
        if self.cache is False:
            return None
        return Path(self.out) / "feature_cache" if self.cache is True else Path(self.cache)


@dataclass(frozen=True)
class ConsistencyOptions:
    """Dice between conditioning masks and a segmentation of their images."""

    images: Source
    masks: Source
    segmenter: Source  # a phantom segmenter (train_segmenter) or a TorchScript model
    out: Source = DEFAULT_OUT
    key: str | None = None


@dataclass(frozen=True)
class ReconstructionOptions:
    """VAE PSNR / SSIM / MAE (HU) through the memory-aware encode/decode path."""

    vae: Source  # a released set (rflow-ct, ...), a maisi checkpoint, model or run folder, or a released .pt file
    data: Source
    preset: str | None = None  # preset of a bare released .pt file (default: from its name, else rflow-ct)
    memory_gb: float | None = None  # memory budget for encode/decode splitting
    device: str = "cpu"
    out: Source = DEFAULT_OUT
    key: str | None = None

    def __post_init__(self):
        _check_device(self.device)


@dataclass(frozen=True)
class DiversityOptions:
    """Mean MS-SSIM between pairs of volumes (lower = more diverse)."""

    data: Source
    size: tuple[int, int, int] | None = None  # centre pad/crop every volume to this shape
    max_pairs: int = 200
    out: Source = DEFAULT_OUT
    key: str | None = None

    def __post_init__(self):
        if isinstance(self.max_pairs, bool) or not isinstance(self.max_pairs, int) or self.max_pairs < 1:
            raise OptionError(f"{{max_pairs}} must be an integer >= 1, got {self.max_pairs!r}", "max_pairs")


@dataclass(frozen=True)
class QualityOptions:
    """Per-organ median-HU quality check, with HU histograms against optional real reference volumes."""

    images: Source
    labels: Source
    reference_images: Source | None = None
    reference_labels: Source | None = None
    out: Source = DEFAULT_OUT
    key: str | None = None

    def __post_init__(self):
        if bool(self.reference_images) != bool(self.reference_labels):
            raise OptionError("give both {reference_images} and {reference_labels}, or neither",
                              "reference_images", "reference_labels")


@dataclass(frozen=True)
class SegmenterOptions:
    """The tiny phantom segmenter that the consistency evaluation uses."""

    out_path: Source  # where to write it (.safetensors)
    steps: int = 2000  # the recipe of benchmarks/results/segmenter.json (held-out Dice 0.87)
    phantoms: int = 128  # training phantoms (regions and spans in turn)
    size: tuple[int, int, int] = (48, 48, 48)  # phantom size (multiples of 16)
    spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)  # phantom spacing (mm)
    seed: int = 0
    device: str = "cpu"
    augment: bool = True  # degrade training crops at random (segmenter.Degradation), for smooth generated images
    channels: tuple[int, int, int, int] = (32, 64, 128, 256)  # the UNet's widths

    def __post_init__(self):
        if len(self.channels) != 4 or any(int(c) < 1 for c in self.channels):
            raise OptionError(f"the UNet's {{channels}} must be 4 positive widths, got {list(self.channels)}", "channels")
        _check_device(self.device)


@dataclass(frozen=True)
class Report:
    """One evaluation's outcome: what it measured (the JSON report), its one-line summary and the files written."""

    name: str  # fid, consistency, reconstruction, diversity or quality
    data: dict[str, Any]
    summary: str
    files: tuple[Path, ...]
    passed: bool = True  # False when some volume failed the quality check
