"""PyTorch datasets: CT patches for the VAE, cached latents (μ, σ + conditions) for diffusion and ControlNet."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from maisi.data.datalist import read_datalist
from maisi.io.volume import is_nifti, read_volume
from maisi.labels import HU_MAX, HU_MIN, modality_code

REGION_KEYS = ("top_region_index", "bottom_region_index")


def load_datalist(path: str | Path, key: str = "training", require: Sequence[str] = ("image",)) -> list[dict]:
    """Entries of a datalist JSON with file paths made absolute (relative ones are relative to the JSON).

    Raises ValueError for an empty list or entries missing a required key, FileNotFoundError for files."""
    entries = []
    for e in read_datalist(path, key):
        e.pop("_where", None)
        for k in ("image", "label", "mask"):  # read_datalist anchors image/label; mask too here
            if isinstance(e.get(k), str):
                e[k] = str((Path(path).parent / e[k]).resolve())
        entries.append(e)
    return check_entries(entries, require, source=str(path))


def check_entries(entries: Sequence[dict], require: Sequence[str] = ("image",), source: str = "datalist") -> list[dict]:
    if not entries:
        raise ValueError(f"{source}: the datalist has no entries")
    missing_files = []
    for k, e in enumerate(entries):
        for key in require:
            if key not in e or e[key] is None:
                name = e.get("image", f"entry {k}")
                raise ValueError(f"{source}: entry {k} ({name}) has no {key!r}; required: {list(require)}")
        for key in ("image", "label"):
            if key in require and not Path(e[key]).exists():
                missing_files.append(e[key])
    if missing_files:
        more = f" and {len(missing_files) - 3} more" if len(missing_files) > 3 else ""
        raise FileNotFoundError(f"{source}: missing files: {', '.join(missing_files[:3])}{more}")
    return list(entries)


# ---------------------------------------------------------------------------------------------
# VAE: random CT patches in [0, 1]
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Reference-style augmentations, each off unless asked for."""

    flip_prob: float = 0.0  # per axis
    affine_prob: float = 0.0  # small rotation (±rotate rad) and scaling (±scale)
    rotate: float = 0.1
    scale: float = 0.1
    intensity_prob: float = 0.0  # intensity scale (±0.1) and shift (±0.05) in [0, 1] units


def vae_transforms(patch_size: Sequence[int], augment: Augment = Augment(), spacing: Sequence[float] | None = None):
    """MONAI chain: load -> RAS -> (spacing) -> HU [-1000,1000] -> [0,1] -> pad -> random crop -> augment."""
    from monai import transforms as mt

    steps: list[Any] = [
        mt.LoadImaged(keys="image", image_only=True, ensure_channel_first=True),
        mt.Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if spacing is not None:
        steps.append(mt.Spacingd(keys="image", pixdim=tuple(spacing), mode="bilinear"))
    steps += [
        mt.ScaleIntensityRanged(keys="image", a_min=HU_MIN, a_max=HU_MAX, b_min=0.0, b_max=1.0, clip=True),
        mt.SpatialPadd(keys="image", spatial_size=tuple(patch_size), mode="constant", value=0.0),
        mt.RandSpatialCropd(keys="image", roi_size=tuple(patch_size), random_size=False),
    ]
    if augment.flip_prob > 0:
        steps += [mt.RandFlipd(keys="image", prob=augment.flip_prob, spatial_axis=a) for a in range(3)]
    if augment.affine_prob > 0:
        steps.append(mt.RandAffined(keys="image", prob=augment.affine_prob, rotate_range=[augment.rotate] * 3,
                                    scale_range=[augment.scale] * 3, mode="bilinear", padding_mode="zeros"))
    if augment.intensity_prob > 0:
        steps += [mt.RandScaleIntensityd(keys="image", factors=0.1, prob=augment.intensity_prob),
                  mt.RandShiftIntensityd(keys="image", offsets=0.05, prob=augment.intensity_prob)]
    steps.append(mt.EnsureTyped(keys="image", dtype=torch.float32, track_meta=False))
    return mt.Compose(steps)


def vae_patch_dataset(entries: Sequence[dict], patch_size: Sequence[int], augment: Augment = Augment(),
                      spacing: Sequence[float] | None = None, seed: int = 0):
    """A MONAI Dataset of {"image": 1×P×P×P in [0,1]} random patches of CT images (NIfTI or DICOM folders)."""
    from monai.data import Dataset as MonaiDataset

    if len(patch_size) != 3 or min(patch_size) < 4 or any(p % 4 for p in patch_size):
        raise ValueError(f"patch_size must be 3 multiples of 4 (the VAE's factor), got {list(patch_size)}")
    entries = check_entries(entries, ("image",))
    tf = vae_transforms(patch_size, augment, spacing)
    tf.set_random_state(seed=seed)
    return MonaiDataset(data=[{"image": e["image"]} for e in entries], transform=tf)


# ---------------------------------------------------------------------------------------------
# Diffusion / ControlNet: cached latents
# ---------------------------------------------------------------------------------------------


def load_latents(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(μ, σ) C×x×y×z from a prepared .safetensors file; a NIfTI latent (reference layout X×Y×Z×C) gives (μ, None)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot read latents ({type(e).__name__}: {e})") from e
        if "mu" not in t:
            raise ValueError(f"{path}: latent file has no 'mu' tensor (keys: {sorted(t)})")
        return t["mu"].float(), t["sigma"].float() if "sigma" in t else None
    if is_nifti(path):
        import nibabel as nib

        arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        if arr.ndim != 4:
            raise ValueError(f"{path}: a NIfTI latent must be X×Y×Z×C, got shape {arr.shape}")
        return torch.from_numpy(np.moveaxis(arr, -1, 0).copy()), None
    raise ValueError(f"{path}: latents must be .safetensors (from `maisi prepare`) or NIfTI")


class LatentDataset(Dataset):
    """Items {"latent", "spacing", "top_region_index", "bottom_region_index", "modality"[, "mask"]}.

    sample="mean" returns μ; sample="sample" returns μ + σ·ε with ε drawn from (seed, epoch, index), so
    an item is the same whatever the worker or batch. with_mask adds the label map (1×X×Y×Z long) at
    image resolution (4× the latent) for ControlNet training.
    """

    def __init__(self, entries: Sequence[dict], sample: str = "mean", latent_channels: int = 4,
                 with_mask: bool = False, require_regions: bool = True, seed: int = 0, modality: str = "ct"):
        if sample not in ("mean", "sample"):
            raise ValueError(f"sample must be 'mean' or 'sample', got {sample!r}")
        require = ["image", "spacing"] + (list(REGION_KEYS) if require_regions else []) + (["label"] if with_mask else [])
        self.entries = check_entries(entries, require)
        self.sample, self.channels, self.with_mask = sample, latent_channels, with_mask
        self.seed, self.epoch, self.default_modality = seed, 0, modality
        for k, e in enumerate(self.entries):
            if len(e["spacing"]) != 3:
                raise ValueError(f"entry {k} ({e['image']}): spacing needs 3 values, got {e['spacing']}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = self.entries[i]
        mu, sigma = load_latents(e["image"])
        if mu.ndim != 4 or mu.shape[0] != self.channels:
            raise ValueError(f"{e['image']}: latents have shape {list(mu.shape)}; expected {self.channels}×x×y×z")
        if self.sample == "sample":
            if sigma is None:
                raise ValueError(f"{e['image']}: no σ stored, cannot sample; use sample='mean'")
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
            z = mu + sigma * torch.randn(mu.shape, generator=g)
        else:
            z = mu
        item = {
            "latent": z,
            "spacing": torch.tensor(e["spacing"], dtype=torch.float32),
            "modality": torch.tensor(modality_code(e.get("modality", self.default_modality)), dtype=torch.long),
        }
        for k in REGION_KEYS:
            if k in e:
                item[k] = torch.tensor(e[k], dtype=torch.float32)
        if self.with_mask:
            mask = read_volume(e["label"]).array
            want = tuple(4 * s for s in mu.shape[1:])
            if mask.shape != want:
                raise ValueError(f"{e['label']}: mask shape {list(mask.shape)} does not match latents "
                                 f"{list(mu.shape[1:])} (expected 4× = {list(want)})")
            item["mask"] = torch.from_numpy(mask.astype(np.int64))[None]
        return item
