"""Training data: checked datalist volumes, random (augmented) image patches, cached latents with their conditions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from maisi import labels
from maisi.data.augment import AUGMENTS, Augment, augment_transform
from maisi.data.labelmap import read_label_ids
from maisi.data.regions import parse_span
from maisi.io.volume import check_volume_file, is_nifti, is_nrrd, read_volume

INTENSITIES = ("ct", "percentile")  # how image intensities map to [0, 1] (see normalise)
LATENT_USES = ("mean", "sample")  # what a latent case trains on: mu, or mu + sigma·eps
LABEL_SCALE = 4  # a ControlNet label map is this many times its latent's size per axis (the VAE's factor)
LATENT_FORMATS = "a .safetensors file with a 'mu' tensor (from `maisi prepare`) or a channels-last NIfTI (X×Y×Z×C)"


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
    refuse(problems)


def refuse(problems: Sequence[str]) -> None:
    """One error naming every refused training file with its rule (nothing if there are none)."""
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


def volume_shape(path: str | Path) -> tuple[int, ...] | None:
    """A checked volume's voxel grid from its header alone (NIfTI, NRRD); None for a DICOM folder."""
    path = Path(path)
    if path.is_dir():
        return None
    if is_nrrd(path):
        return tuple(int(n) for n in nrrd.read_header(str(path))["sizes"][:3])
    return tuple(int(n) for n in nib.load(str(path)).shape[:3])


def check_patches(entries: Sequence[dict[str, Any]], edges: Sequence[int], multiple: int) -> None:
    """Each patch edge is a positive multiple of the autoencoder's factor `multiple` and, as a patch larger than
    a volume is zero-padded (air) at the end of each shorter axis, at most the largest edge of the training
    volumes (a larger one would be padding along every axis of every volume)."""
    for edge in edges:
        if edge < 1 or edge % multiple:
            lower = max(multiple, edge // multiple * multiple)
            raise ValueError(f"patch {edge} must be a positive multiple of {multiple} (the autoencoder downsamples "
                             f"by {multiple}), e.g. {lower} or {lower + multiple}")
    shapes = [s for s in (volume_shape(e["image"]) for e in entries) if s]
    largest = max((max(s) for s in shapes), default=None)
    if largest is not None and max(edges) > largest:
        raise ValueError(f"patch {max(edges)} is larger than every training volume (the largest edge is {largest} "
                         f"voxels): a patch is zero-padded where a volume is shorter, and this one would be padding "
                         f"along every axis; use a patch of at most {largest // multiple * multiple}")


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
    if "top_region_index" in out and "bottom_region_index" in out:  # the generator's rule: top first (head to feet)
        top, bottom = (int(out[k].argmax()) for k in ("top_region_index", "bottom_region_index"))
        try:
            parse_span(f"{labels.REGIONS[top]}-{labels.REGIONS[bottom]}")
        except ValueError as e:
            raise ValueError(f"{where}: top_region_index {meta['top_region_index']!r} and bottom_region_index "
                             f"{meta['bottom_region_index']!r}: {e}") from None
    modality = meta.get("modality", default_modality)
    out["modality"] = torch.tensor(labels.modality_code(modality), dtype=torch.long)
    return out


def _unreadable_latent(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path}: cannot read latents ({type(error).__name__}: {error}); expected {LATENT_FORMATS}")


def read_latent_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mu, sigma or None), C×x×y×z, of a cached latent: `maisi prepare`'s .safetensors (`mu`, `sigma`), or
    the reference's channels-last NIfTI (X×Y×Z×C, mu only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            t = load_file(str(path))
        except Exception as e:
            raise _unreadable_latent(path, e) from e
        if "mu" not in t:
            raise ValueError(f"{path}: latent file has no 'mu' tensor (keys: {sorted(t)})")
        mu, sigma = t["mu"].float(), t["sigma"].float() if "sigma" in t else None
    elif is_nifti(path):
        try:
            arr = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        except Exception as e:  # nibabel raises several types for files that are not (whole) NIfTI
            raise _unreadable_latent(path, e) from e
        if arr.ndim != 4:
            raise ValueError(f"{path}: a NIfTI latent must be X×Y×Z×C, got shape {arr.shape}")
        mu, sigma = torch.from_numpy(np.moveaxis(arr, -1, 0).copy()), None
    else:
        raise ValueError(f"{path}: latents must be .safetensors (from `maisi prepare`) or NIfTI")
    if mu.ndim == 5 and mu.shape[0] == 1:
        mu, sigma = mu[0], None if sigma is None else sigma[0]
    return mu, sigma


def latent_header(path: str | Path) -> tuple[tuple[int, ...], bool]:
    """(C×x×y×z shape, whether it holds sigma) of a cached latent file from its header alone (safetensors
    metadata, NIfTI header): read_latent_file's checks before any voxel is read."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                keys = set(f.keys())
                if "mu" not in keys:
                    raise ValueError(f"{path}: latent file has no 'mu' tensor (keys: {sorted(keys)})")
                shape = tuple(f.get_slice("mu").get_shape())
            if len(shape) == 5 and shape[0] == 1:
                shape = shape[1:]
            return shape, "sigma" in keys
        if not is_nifti(path):
            raise ValueError(f"{path}: latents must be .safetensors (from `maisi prepare`) or NIfTI")
        img = nib.load(str(path))
    except ValueError:
        raise
    except Exception as e:  # safetensors and nibabel raise their own types for files that are not theirs
        raise _unreadable_latent(path, e) from e
    if len(img.shape) != 4:
        raise ValueError(f"{path}: a NIfTI latent must be X×Y×Z×C (channels last), got shape {img.shape}: an image "
                         "rather than its latent? (`maisi prepare --vae` writes the latents)")
    return (img.shape[3], *img.shape[:3]), False


def read_label_map(path: str | Path) -> torch.Tensor:
    """A ControlNet label map, 1×X×Y×Z int64: integer ids of the MAISI vocabulary only (the generator takes
    no other); errors name the file."""
    return torch.from_numpy(read_label_ids(path))[None]


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
        self._check_files()
        self._read = lru_cache(maxsize=len(entries) if cache else 1)(self._read_item)

    def _check_files(self) -> None:
        """Every latent's header (format, channels, sigma where `use` needs it) and every label map (integer
        MAISI ids, 4× its latent's size), before any work; the error names every refused file."""
        problems = []
        for e in self.entries:
            try:
                shape, has_sigma = latent_header(e["latent"])
                self._check_latent(e["latent"], shape, has_sigma)
                if self.with_label:
                    self._check_label(e["label"], read_label_map(e["label"]).shape[1:], shape)
            except ValueError as err:
                problems.append(f"{e['_where']}: {err}")
        refuse(problems)

    def _check_latent(self, path: str, shape: Sequence[int], has_sigma: bool) -> None:
        if len(shape) != 4 or shape[0] != self.channels:
            raise ValueError(f"{path}: latent of shape {tuple(shape)}; the model needs {self.channels}×x×y×z "
                             f"(autoencoder latent_channels = {self.channels})")
        if self.use == "sample" and not has_sigma:
            raise ValueError(f"latent='sample' needs a 'sigma' tensor in the latent file {path}")

    @staticmethod
    def _check_label(path: str, shape: Sequence[int], latent_shape: Sequence[int]) -> None:
        want = tuple(LABEL_SCALE * n for n in latent_shape[1:])
        if tuple(shape) != want:
            raise ValueError(f"{path}: label shape {tuple(shape)} is not {LABEL_SCALE}× the latent's "
                             f"{tuple(latent_shape[1:])} (expected {want})")

    def __len__(self) -> int:
        return len(self.entries)

    def _read_item(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        e = self.entries[i]
        mu, sigma = read_latent_file(e["latent"])  # checked when made; a file changed since fails as clearly
        self._check_latent(e["latent"], mu.shape, sigma is not None)
        label = None
        if self.with_label:
            label = read_label_map(e["label"])
            self._check_label(e["label"], label.shape[1:], mu.shape)
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
