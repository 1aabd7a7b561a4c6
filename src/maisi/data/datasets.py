"""Training data: checked datalist volumes, random (augmented) image patches, cached latents with their conditions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import load_file

from maisi import labels
from maisi.data.augment import AUGMENTS, Augment, augment_transform
from maisi.io.volume import check_volume_file, is_nifti, read_volume

INTENSITIES = ("ct", "percentile")  # how image intensities map to [0, 1] (see normalise)
LATENT_USES = ("mean", "sample")  # what a latent case trains on: mu, or mu + sigma·eps


def require_files(entries: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Every entry names an existing file for each key; the error lists the first few that do not."""
    problems = []
    for e in entries:
        for k in keys:
            if k not in e:
                problems.append(f"{e['_where']}: no {k!r} field")
            elif not Path(e[k]).exists():
                problems.append(f"{e['_where']}: missing file {e[k]}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise FileNotFoundError("; ".join(problems[:5]) + more)


def check_volumes(entries: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Every entry's volume for each key exists and passes check_volume_file (readable 3D, voxel size,
    orientation, finite voxels), before any work; the error names every refused file with its rule."""
    require_files(entries, keys)
    problems = []
    for e in entries:
        for k in keys:
            try:
                check_volume_file(e[k])
            except ValueError as err:
                problems.append(f"{e['_where']} ({k}): {err}")
    if problems:
        raise ValueError(f"{len(problems)} training file(s) refused before any work (fix them or remove their "
                         "entries):\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# VAE: random image patches in [0, 1]
# ---------------------------------------------------------------------------------------------


def normalise(array: np.ndarray, intensity: str) -> np.ndarray:
    """Image intensities to [0, 1]: "ct" clips HU to [-1000, 1000]; "percentile" maps p0.5..p99.5."""
    a = array.astype(np.float32)
    if intensity == "ct":
        lo, hi = labels.HU_RANGE
    elif intensity == "percentile":
        lo, hi = (float(v) for v in np.percentile(a, [0.5, 99.5]))
        hi = max(hi, lo + 1e-6)
    else:
        raise ValueError(f"intensity must be {' or '.join(map(repr, INTENSITIES))}, got {intensity!r}")
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def random_crop(array: np.ndarray, size: Sequence[int], g: torch.Generator) -> np.ndarray:
    """A random window of `size` (zero-padded at the end where an axis is shorter)."""
    starts = [int(torch.randint(0, max(1, n - s) + 1, (1,), generator=g)) for n, s in zip(array.shape, size)]
    win = array[tuple(slice(st, st + s) for st, s in zip(starts, size))]
    pad = [(0, s - n) for n, s in zip(win.shape, size)]
    return np.pad(win, pad) if any(p for _, p in pad) else np.ascontiguousarray(win)


class ImagePatches:
    """Random patches of image volumes in [0, 1], augmented as `augment` says.

    `patches`: the curriculum as (first step, edge) pairs, e.g. [(0, 64), (2000, 128)]; a sample's step is
    its number // batch_size. A sample's crop and augmentation come from its generator alone, and the crop
    is the same with or without augmentation."""

    def __init__(self, entries: list[dict[str, Any]], patches: Sequence[tuple[int, int]], batch_size: int = 1,
                 intensity: str = "ct", augment: Augment = AUGMENTS["none"], cache: bool = True):
        require_files(entries, ["image"])
        if not patches or any(p < 1 for _, p in patches) or patches[0][0] != 0:
            raise ValueError(f"patch curriculum must start at step 0 with positive sizes, got {list(patches)}")
        self.entries, self.patches, self.batch_size = entries, sorted(patches), batch_size
        self.intensity, self.augment = intensity, augment
        self._augment = augment_transform(augment) if augment.active else None
        self._read = lru_cache(maxsize=len(entries) if cache else 1)(self._read_item)

    def __len__(self) -> int:
        return len(self.entries)

    def _read_item(self, i: int) -> np.ndarray:
        return normalise(read_volume(self.entries[i]["image"]).array, self.intensity)

    def patch_at(self, step: int) -> int:
        return [p for s, p in self.patches if s <= step][-1]

    def load(self, i: int, g: torch.Generator, sample: int = 0) -> dict[str, torch.Tensor]:
        image = self._read(i)
        edge = self.patch_at(sample // self.batch_size)
        patch = torch.from_numpy(random_crop(image, (edge,) * image.ndim, g))[None]
        if self._augment is not None:  # drawn after the crop, so the crop does not depend on augment
            self._augment.set_random_state(seed=int(torch.randint(0, 2**31, (1,), generator=g)))
            patch = self._augment(patch)
        return {"image": patch}


# ---------------------------------------------------------------------------------------------
# Diffusion / ControlNet: cached latents with their conditions (the JSON sidecar of `maisi prepare`, or
# the datalist entry itself)
# ---------------------------------------------------------------------------------------------


def _region(value: Any, name: str, where: str) -> list[float]:
    if isinstance(value, str):
        return labels.region_one_hot(labels.region_index(value))
    if isinstance(value, int):
        return labels.region_one_hot(value)
    if isinstance(value, (list, tuple)) and len(value) == len(labels.REGIONS):
        v = [float(x) for x in value]
        if sorted(v) == [0.0] * (len(v) - 1) + [1.0]:
            return v
    raise ValueError(f"{where}: {name} must be a region name, an index 0..3 or a one-hot of 4, got {value!r}")


def conditions(meta: dict[str, Any], where: str, default_modality: int = 1) -> dict[str, torch.Tensor]:
    """spacing (3 mm), top/bottom region one-hots and modality code of a case; errors name the field."""
    if "spacing" not in meta:
        raise ValueError(f"{where}: no 'spacing' given (voxel size in mm of the image the latent encodes); "
                         "the diffusion model is conditioned on it")
    sp = meta["spacing"]
    if not (isinstance(sp, (list, tuple)) and len(sp) == 3 and all(float(s) > 0 for s in sp)):
        raise ValueError(f"{where}: spacing must be 3 positive mm values, got {sp!r}")
    out = {"spacing": torch.tensor([float(s) for s in sp], dtype=torch.float32)}
    for k in ("top_region_index", "bottom_region_index"):
        if k in meta:
            out[k] = torch.tensor(_region(meta[k], k, where), dtype=torch.float32)
    modality = meta.get("modality", default_modality)
    out["modality"] = torch.tensor(labels.modality_code(modality), dtype=torch.long)
    return out


def read_latent_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mu, sigma or None), C×x×y×z, of a cached latent: `maisi prepare`'s .safetensors (`mu`, `sigma`), or
    the reference's channels-last NIfTI (X×Y×Z×C, mu only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            t = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot read latents ({type(e).__name__}: {e})") from e
        if "mu" not in t:
            raise ValueError(f"{path}: latent file has no 'mu' tensor (keys: {sorted(t)})")
        mu, sigma = t["mu"].float(), t["sigma"].float() if "sigma" in t else None
    elif is_nifti(path):
        arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        if arr.ndim != 4:
            raise ValueError(f"{path}: a NIfTI latent must be X×Y×Z×C, got shape {arr.shape}")
        mu, sigma = torch.from_numpy(np.moveaxis(arr, -1, 0).copy()), None
    else:
        raise ValueError(f"{path}: latents must be .safetensors (from `maisi prepare`) or NIfTI")
    if mu.ndim == 5 and mu.shape[0] == 1:
        mu, sigma = mu[0], None if sigma is None else sigma[0]
    return mu, sigma


def sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a latent file (`<file>.json`, else `<stem>.json`), or {} if there is none."""
    path = Path(path)
    stem = path.name.split(".")[0]
    for cand in (path.with_name(path.name + ".json"), path.with_name(stem + ".json")):
        if cand.is_file():
            return json.loads(cand.read_text())
    return {}


class LatentCases:
    """Cached VAE latents with their conditions (and image-resolution label maps for ControlNet).

    `use`: "mean" trains on mu; "sample" on mu + sigma·ε drawn per sample (the reference's cache)."""

    def __init__(self, entries: list[dict[str, Any]], channels: int, use: str = "mean", with_label: bool = False,
                 default_modality: int = 1, cache: bool = True):
        if use not in LATENT_USES:
            raise ValueError(f"use must be {' or '.join(map(repr, LATENT_USES))}, got {use!r}")
        for e in entries:
            if "latent" not in e and "image" in e:
                e["latent"] = e["image"]  # the reference's datalists name the latent file "image"
        require_files(entries, ["latent", "label"] if with_label else ["latent"])
        self.entries, self.channels, self.use, self.with_label = entries, channels, use, with_label
        self.default_modality = default_modality
        self.meta = [{**sidecar(e["latent"]), **{k: v for k, v in e.items() if not k.startswith("_")}}
                     for e in entries]
        self.conds = [conditions(m, e["_where"], default_modality) for m, e in zip(self.meta, entries)]
        self._read = lru_cache(maxsize=len(entries) if cache else 1)(self._read_item)

    def __len__(self) -> int:
        return len(self.entries)

    def _read_item(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        e = self.entries[i]
        mu, sigma = read_latent_file(e["latent"])
        if mu.ndim != 4 or mu.shape[0] != self.channels:
            raise ValueError(f"{e['latent']}: latent of shape {tuple(mu.shape)}; the model needs "
                             f"{self.channels}×x×y×z (autoencoder latent_channels = {self.channels})")
        if self.use == "sample" and sigma is None:
            raise ValueError(f"latent='sample' needs a 'sigma' tensor in the latent file {e['latent']}")
        label = None
        if self.with_label:
            label = torch.from_numpy(read_volume(e["label"]).array.astype(np.int64))[None]
            want = tuple(4 * n for n in mu.shape[1:])
            if tuple(label.shape[1:]) != want:
                raise ValueError(f"{e['label']}: label shape {tuple(label.shape[1:])} is not 4× the latent's "
                                 f"{tuple(mu.shape[1:])} (expected {want})")
        return mu, sigma, label

    def latent(self, i: int, g: torch.Generator | None = None) -> torch.Tensor:
        mu, sigma, _ = self._read(i)
        if self.use == "sample":
            return mu + sigma * torch.randn(mu.shape, generator=g)
        return mu

    def load(self, i: int, g: torch.Generator, sample: int = 0) -> dict[str, torch.Tensor]:
        out = {"latent": self.latent(i, g), **self.conds[i]}
        if self.with_label:
            out["label"] = self._read(i)[2]
        return out
