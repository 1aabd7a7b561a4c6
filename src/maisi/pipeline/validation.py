"""A generation request and its validation against the model's size/spacing rules, before any compute."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maisi.config import PRESETS, ModelConfig, to_dict
from maisi.data.regions import parse_span
from maisi.diffusion.schedulers import COMPATIBLE_SAMPLERS
from maisi.io.atomic import check_output_dir
from maisi.io.formats import DEFAULT_EXT, check_output_exts
from maisi.io.volume import check_volume_file
from maisi.labels import REGIONS, TUMOR_HOSTS, label_id, label_name

SAMPLERS = ("rflow", "ddpm", "ddim")
MASK_SOURCES = ("auto", "database", "none")
TIMESTEPS = ("reference", "clean")  # rectified flow: NVIDIA's float16/int() timesteps, or maisi's exact ones
# Attempt a of the sample with seed s uses seed s + a·2^SEED_BITS: sample seeds stay below 2^SEED_BITS and at most
# 2^(32 − SEED_BITS) attempts are made, so every (sample, attempt) of a run gets its own 32-bit seed.
SEED_BITS = 28
MAX_ATTEMPTS = 2 ** (32 - SEED_BITS)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything `Pipeline.generate` needs; None fields take the model's defaults."""

    body_region: tuple[str, ...] = ()  # one region or a (top, bottom) span; () = the model's default
    size: tuple[int, ...] | None = None  # voxels, 1 or 3 values
    spacing: tuple[float, ...] | None = None  # mm, 1 or 3 values
    modality: str | int | None = None
    num_samples: int = 1
    seed: int = 0
    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    anatomy: tuple[str, ...] = ()  # vocabulary names that the mask must contain
    mask: str | None = None  # user label map (NIfTI, NRRD or DICOM folder)
    mask_mapping: str | None = None  # JSON {source name or id: MAISI name or id}
    mask_source: str = "auto"  # auto: user mask, else database when the model has a ControlNet; none: image only
    mask_database: str | None = None  # folder with index.json; None: the built-in phantom database
    tumor: tuple[str, ...] = ()  # tumours to inpaint into the host organ of the mask
    batch_size: int = 1
    memory_gb: float | None = None
    quality_retries: int = 2  # attempts added when the quality check fails (new seed, next database mask)
    quality_check: bool = True
    timesteps: str | None = None  # rflow: "reference" (NVIDIA's), "clean"; None: the model's (reference if released)
    image_output_ext: str = DEFAULT_EXT  # the NIM's names: .nii.gz, .nii, .nrrd, .dcm (a folder of CT slices)
    label_output_ext: str = DEFAULT_EXT  # .nii.gz, .nii, .nrrd, .dcm (a DICOM SEG)
    # a new mask from the mask generation model: (structure, size in [0, 1] or -1) pairs (maskgen.context)
    anatomy_size: tuple[tuple[str, float], ...] = ()
    anatomy_conditions: str | None = None  # conditions file; None: the one beside the mask model's weights
    mask_sampler: str | None = None  # "ddpm"/"ddim" (ε models), "rflow"; None: the mask model's (released: DDPM)
    mask_steps: int | None = None  # None: the mask model's (released: 1000)
    mask_guidance: float | None = None  # guidance on the size context; None: the mask model's (released: 0, none)


@dataclass(frozen=True)
class SizeRules:
    """Which output grids a model accepts (REFERENCE §3 for the released CT models)."""

    divisor: int
    xy_sizes: tuple[int, ...] | None = None  # allowed X = Y sizes; None: any multiple of divisor
    z_range: tuple[int, int, int] | None = None  # (min, max, step)
    xy_spacing: tuple[float, float] = (0.05, 20.0)
    z_spacing: tuple[float, float] = (0.05, 20.0)
    min_fov_head: float | None = None  # mm, advised in-plane field of view
    min_fov_body: float | None = None
    max_voxels: int = 1024**3


def rules_for(config: ModelConfig) -> SizeRules:
    """The released CT networks get the reference rules; any other model only its size divisor."""
    released = any(
        to_dict(config.unet) == to_dict(p.unet) and to_dict(config.autoencoder)["channels"] == list(p.autoencoder.channels)
        for name, p in PRESETS.items() if name in ("rflow-ct", "ddpm-ct")
    )
    if released and config.default_modality == 1:
        return SizeRules(config.image_divisor, (256, 384, 512), (128, 768, 128), (0.5, 3.0), (0.5, 5.0), 256.0, 384.0)
    return SizeRules(config.image_divisor)


def triple(values: Any, name: str, cast: type = float) -> tuple:
    """1 or 3 values as a 3-tuple of `cast`; anything else is a ValueError."""
    vals = [values] if isinstance(values, int | float | str) else list(values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ValueError(f"{name} takes 1 or 3 values, got {len(vals)}: {vals}")
    try:
        out = tuple(cast(v) for v in vals)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {vals}") from None
    if cast is int and any(float(v) != int(float(v)) for v in vals):
        raise ValueError(f"{name} must be whole numbers of voxels, got {vals}")
    return out


def check_geometry(size: Sequence[int], spacing: Sequence[float], regions: tuple[int, int],
                   rules: SizeRules) -> list[str]:
    """Raise ValueError for a grid the model cannot produce; return warnings for advised limits."""
    d = rules.divisor
    if any(s <= 0 for s in size):
        raise ValueError(f"size must be positive voxel counts, got {list(size)}")
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive mm values, got {list(spacing)}")
    bad = [s for s in size if s % d]
    if bad:
        near = sorted({v for s in bad for v in (max(d, s // d * d), (s // d + 1) * d)})
        raise ValueError(f"size {list(size)}: every axis must be a multiple of {d} for this model "
                         f"(the VAE's and the UNet's downsampling); nearest allowed: {near}")
    if math.prod(size) > rules.max_voxels:
        raise ValueError(f"size {list(size)} has {math.prod(size)} voxels; at most {rules.max_voxels}")
    if rules.xy_sizes is not None and (size[0] != size[1] or size[0] not in rules.xy_sizes):
        raise ValueError(f"size {list(size)}: this model needs X = Y in {list(rules.xy_sizes)}")
    if rules.z_range is not None:
        lo, hi, step = rules.z_range
        if not (lo <= size[2] <= hi and size[2] % step == 0):
            raise ValueError(f"size {list(size)}: Z must be in {lo}..{hi} in steps of {step}")
    for name, values, (lo, hi) in (("x/y", spacing[:2], rules.xy_spacing), ("z", spacing[2:], rules.z_spacing)):
        if any(not lo <= v <= hi for v in values):
            raise ValueError(f"spacing {list(spacing)}: {name} spacing must be in {lo}..{hi} mm for this model")
    warnings: list[str] = []
    head_only = regions == (0, 0)
    advised = rules.min_fov_head if head_only else rules.min_fov_body
    fov = min(size[0] * spacing[0], size[1] * spacing[1])
    if advised and fov < advised:
        suggest = math.ceil(advised / min(size[:2]) * 100) / 100
        warnings.append(f"in-plane field of view {fov:.0f} mm is below the advised {advised:.0f} mm for "
                        f"{'head' if head_only else 'body'} regions (anatomy may be unusable); "
                        f"try spacing {suggest} or a larger size")
    return warnings


def check_sampler(sampler: str, trained: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    if sampler not in COMPATIBLE_SAMPLERS[trained]:
        raise ValueError(f"this model was trained with {trained}; it can be sampled with "
                         f"{list(COMPATIBLE_SAMPLERS[trained])}, not {sampler}")


def check_numbers(request: GenerationRequest, num_train_timesteps: int) -> None:
    r = request
    if r.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {r.num_samples}")
    if r.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {r.batch_size}")
    if r.seed < 0:
        raise ValueError(f"seed must be >= 0, got {r.seed}")
    if r.seed + r.num_samples > 2**SEED_BITS:
        raise ValueError(f"seeds must stay below 2^{SEED_BITS} = {2**SEED_BITS} (retries use the seeds above): "
                         f"seed {r.seed} with {r.num_samples} samples reaches {r.seed + r.num_samples - 1}")
    if r.steps is not None and not 1 <= r.steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {r.steps}")
    if r.guidance is not None and (not math.isfinite(r.guidance) or r.guidance < 0):
        raise ValueError(f"guidance must be a finite number >= 0 (0: off), got {r.guidance}")
    if r.memory_gb is not None and r.memory_gb <= 0:
        raise ValueError(f"memory_gb must be > 0, got {r.memory_gb}")
    if not 0 <= r.quality_retries < MAX_ATTEMPTS:
        raise ValueError(f"quality_retries must be in 0..{MAX_ATTEMPTS - 1}, got {r.quality_retries}")
    if r.timesteps is not None and r.timesteps not in TIMESTEPS:
        raise ValueError(f"timesteps must be one of {list(TIMESTEPS)} (or None: the model's), got {r.timesteps!r}")
    if r.mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source must be one of {list(MASK_SOURCES)}, got {r.mask_source!r}")


_SAMPLE_FILE = re.compile(r"sample_seed(\d+)_")


def unused_fields(request: GenerationRequest) -> list[str]:
    """Warnings for fields that the rest of the request makes have no effect (set, and silently ignored)."""
    r, out = request, []
    mask_model = [f for f in ("anatomy_conditions", "mask_sampler", "mask_steps", "mask_guidance")
                  if getattr(r, f) is not None]
    if mask_model and not r.anatomy_size:
        out.append(f"{', '.join(mask_model)} set{'s' if len(mask_model) == 1 else ''} the mask generation model, "
                   "which only anatomy_size uses: no effect here")
    if r.mask is not None and r.mask_database is not None:
        out.append("mask_database has no effect with a mask: the mask given is used")
    if r.mask_mapping is not None and r.mask is None:
        out.append("mask_mapping converts a mask given with it: no effect without one")
    return out


def sample_files(out: str | Path, seed: int, request: GenerationRequest) -> dict[str, Path]:
    """The files of the sample with `seed` in `out`: image, label, preview, record."""
    stem = Path(out) / f"sample_seed{seed}"
    return {"image": Path(f"{stem}_image{request.image_output_ext}"),
            "label": Path(f"{stem}_label{request.label_output_ext}"),
            "preview": Path(f"{stem}_preview.png"), "record": Path(f"{stem}_record.json")}


def earlier_outputs(request: GenerationRequest, out: str | Path) -> tuple[dict[Path, str], list[Path]]:
    """Files of an earlier run in `out` for the request's seeds: those this run replaces ({path: kind}), and those
    it leaves beside its own (the same sample in another output format). Reads the folder, not every planned
    seed's files: num_samples may be large."""
    replaced: dict[Path, str] = {}
    beside: list[Path] = []
    for path in sorted(Path(out).glob("sample_seed*")) if Path(out).is_dir() else ():
        seed = _SAMPLE_FILE.match(path.name)
        if seed is not None and request.seed <= int(seed[1]) < request.seed + request.num_samples:
            kind = {p: k for k, p in sample_files(out, int(seed[1]), request).items()}.get(path)
            if kind is None:
                beside.append(path)
            else:
                replaced[path] = kind
    return replaced, beside


def check_files(request: GenerationRequest, out: str | Path | None) -> None:
    """The request's files, before any network loads: the output folder can be created and written (not a
    file, not under a file), no sample file's place is taken by something it cannot replace, a known output
    format, and a user mask is a readable volume with finite voxels and a valid geometry."""
    check_output_exts(request.image_output_ext, request.label_output_ext)
    if out is not None:
        check_output_dir(out, "output folder (out)")
        for path, kind in earlier_outputs(request, out)[0].items():
            folder = kind == "image" and request.image_output_ext == ".dcm"  # a DICOM series is a folder
            if path.is_dir() != folder:
                raise ValueError(f"{path} is {'a file' if folder else 'a folder'}, where the sample's {kind} "
                                 f"goes; move it away or choose another output folder (out)")
    if request.mask is not None:
        check_volume_file(request.mask)
    if request.mask_mapping is not None and not Path(request.mask_mapping).is_file():
        raise FileNotFoundError(f"mask_mapping file not found: {request.mask_mapping}")


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of attempt `attempt` of the sample with seed `seed`: the seed itself for attempt 0, then
    seed + attempt·2^SEED_BITS. Injective on (seed < 2^SEED_BITS, attempt < MAX_ATTEMPTS) into 32 bits, so a
    retry never reuses the seed of any sample or attempt of any run (torch's CPU generator reads 32 bits only)."""
    if not 0 <= seed < 2**SEED_BITS or not 0 <= attempt < MAX_ATTEMPTS:
        raise ValueError(f"seed must be in 0..{2**SEED_BITS - 1} and attempt in 0..{MAX_ATTEMPTS - 1}, "
                         f"got seed {seed}, attempt {attempt}")
    return seed + (attempt << SEED_BITS)


def parse_regions(regions: Sequence[str]) -> tuple[int, int] | None:
    """(top, bottom) indices of one region, a span given as two names, or "chest-abdomen"; () gives None."""
    if any(not isinstance(r, str) or not r.strip() for r in regions):
        raise ValueError(f"body region names must be non-empty, got {list(regions)}; choose from {list(REGIONS)} "
                         "(or leave body region out for the model's default)")
    names = list(regions)
    if not names:
        return None
    if len(names) > 2:
        raise ValueError(f"body region takes one region or a span of two (top bottom), got {list(names)}")
    return parse_span("-".join(names))


def anatomy_ids(names: Sequence[str]) -> tuple[int, ...]:
    """Vocabulary ids of anatomy names (unknown names raise with the closest names)."""
    return tuple(dict.fromkeys(label_id(n.replace("_", " ") if isinstance(n, str) else n) for n in names))


def tumor_ids(names: Sequence[str]) -> tuple[int, ...]:
    ids = anatomy_ids(names)
    for t in ids:
        if t not in TUMOR_HOSTS:
            raise ValueError(f"{label_name(t)!r} is not a tumour that can be inpainted; choose from "
                             f"{[label_name(i) for i in TUMOR_HOSTS]}")
    return ids


@dataclass(frozen=True)
class SizeControl:
    """A checked size request: the slots asked for, the completed 10-vector, and the conditions it came from."""

    requested: dict[str, float]  # slot name -> size, as asked (canonical names)
    context: tuple[float, ...]  # the completed vector the mask UNet gets
    conditions: str  # the conditions file
    reference_volumes: Any = field(default=None, repr=False)  # K×10 mL of that file, when it records them
    sampler: str = "ddpm"
    steps: int = 1000
    guidance: float = 0.0


@dataclass(frozen=True)
class Plan:
    """A request with every default resolved and checked: what will be generated."""

    request: GenerationRequest
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    regions: tuple[int, int] | None  # None: taken from each mask
    modality: int
    steps: int
    sampler: str
    guidance: float
    anatomy: tuple[int, ...]
    tumors: tuple[int, ...]
    use_mask: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)
    timesteps: str | None = None  # rflow: "reference" or "clean"; None for DDPM/DDIM
    mask_database: str | None = None  # None: the built-in phantom database
    user_mask: Any = field(default=None, repr=False)  # the request's mask (masks.Mask), read and resampled once
    size_control: SizeControl | None = None  # --anatomy-size: the mask comes from the mask generation model
