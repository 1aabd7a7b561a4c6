"""Training data: datalists, random image patches, cached latents with their conditions, per-sample seeding."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from maisi import labels
from maisi.data.datalist import read_datalist  # noqa: F401  (the one datalist reader; re-exported)
from maisi.io.volume import check_volume_file
from maisi.training.state import item_of_sample, sample_generator

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


def random_crop(arrays: Sequence[np.ndarray], size: Sequence[int], g: torch.Generator) -> list[np.ndarray]:
    """The same random window of `size` from each array (zero-padded at the end where an axis is shorter)."""
    shape = arrays[0].shape
    starts = [int(torch.randint(0, max(1, n - s) + 1, (1,), generator=g)) for n, s in zip(shape, size)]
    out = []
    for a in arrays:
        win = a[tuple(slice(st, st + s) for st, s in zip(starts, size))]
        pad = [(0, s - n) for n, s in zip(win.shape, size)]
        out.append(np.pad(win, pad) if any(p for _, p in pad) else np.ascontiguousarray(win))
    return out


class ImagePatches:
    """Random patches of image volumes in [0, 1] (and their label maps when `with_label`).

    `patches`: the curriculum as (first step, edge) pairs, e.g. [(0, 64), (2000, 128)]; a sample's step is
    its number // batch_size."""

    def __init__(self, entries: list[dict[str, Any]], patches: Sequence[tuple[int, int]], batch_size: int = 1,
                 intensity: str = "ct", with_label: bool = False, cache: bool = True):
        require_files(entries, ["image", "label"] if with_label else ["image"])
        if not patches or any(p < 1 for _, p in patches) or patches[0][0] != 0:
            raise ValueError(f"patch curriculum must start at step 0 with positive sizes, got {list(patches)}")
        self.entries, self.patches, self.batch_size = entries, sorted(patches), batch_size
        self.intensity, self.with_label = intensity, with_label
        self._read = lru_cache(maxsize=len(entries) if cache else 1)(self._read_item)

    def __len__(self) -> int:
        return len(self.entries)

    def _read_item(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        from maisi.io.volume import read_volume

        e = self.entries[i]
        image = normalise(read_volume(e["image"]).array, self.intensity)
        label = read_volume(e["label"]).array.astype(np.int64) if self.with_label else None
        if label is not None and label.shape != image.shape:
            raise ValueError(f"{e['_where']}: label shape {label.shape} differs from image shape {image.shape}")
        return image, label

    def patch_at(self, step: int) -> int:
        return [p for s, p in self.patches if s <= step][-1]

    def load(self, i: int, g: torch.Generator, sample: int = 0) -> dict[str, torch.Tensor]:
        image, label = self._read(i)
        arrays = [image] if label is None else [image, label]
        edge = self.patch_at(sample // self.batch_size)
        crops = random_crop(arrays, (edge,) * image.ndim, g)
        out = {"image": torch.from_numpy(crops[0])[None]}
        if label is not None:
            out["label"] = torch.from_numpy(crops[1])[None]
        return out


class SampleDataset(Dataset):
    """Indexed by global sample number: picks the item (shuffled epochs) and a per-sample generator."""

    def __init__(self, source: Any, seed: int):
        self.source, self.seed = source, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, sample: int) -> dict[str, Any]:
        item = item_of_sample(sample, len(self.source), self.seed)
        out = self.source.load(item, sample_generator(self.seed, sample, stream=1), sample)
        out["sample"] = torch.tensor(sample)
        return out


# ---------------------------------------------------------------------------------------------
# Conditions of a latent case (the JSON sidecar of `maisi prepare`, or the datalist entry itself)
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
    """(mu, sigma or None), C×x×y×z, of a cached latent (`maisi prepare`'s .safetensors or a reference NIfTI)."""
    from maisi.data.datasets import load_latents

    path = Path(path)
    mu, sigma = load_latents(path)
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
            from maisi.io.volume import read_volume

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


def latent_std(cases: LatentCases, seed: int = 0) -> float:
    """Standard deviation over all training latents (scale_factor = 1 / std, REFERENCE §3)."""
    total, total2, n = 0.0, 0.0, 0
    for i in range(len(cases)):
        z = cases.latent(i, sample_generator(seed, i, stream=7)).double()
        total, total2, n = total + float(z.sum()), total2 + float(z.pow(2).sum()), n + z.numel()
    var = total2 / n - (total / n) ** 2
    if var <= 0:
        raise ValueError("the training latents are constant, so their scale 1/std is undefined; give scale_factor")
    return var**0.5
