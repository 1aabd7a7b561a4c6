"""Preparation of CT scans for diffusion/ControlNet training: RAS, HU window, resampling, latents μ and σ."""

from __future__ import annotations

import json
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, DivisiblePadd, Orientationd, Resized, ScaleIntensityRanged, Spacingd
from safetensors.torch import save_file

from maisi.data.labelmap import add_body, convert_labels
from maisi.data.regions import parse_span, region_from_label, span_name
from maisi.io.atomic import atomic_write, atomic_write_text, check_output_dir
from maisi.io.volume import check_volume_file, is_nifti, read_volume, write_volume
from maisi.labels import (
    BODY,
    HU_RANGE,
    REGION_MARKERS,
    REGIONS,
    id_to_name,
    label_name,
    modality_code,
    region_one_hot,
)

LABEL_SUFFIXES = ("_label", "_labels", "_seg", "_mask")
IMAGE_SUFFIXES = ("_image", "_img", "_ct", "_0000")


class LabelIdsWarning(UserWarning):
    """A label map prepared without a mapping whose ids look like another numbering than MAISI's."""


class Encoder(Protocol):
    def plan_within(self, op: str, shape: tuple[int, ...], memory_gb: float | None) -> Any: ...

    def encode_within(self, x: torch.Tensor, memory_gb: float | None = None, *,
                      plan: Any = None) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class PrepareConfig:
    """How scans are brought to the training layout (REFERENCE §3)."""

    spacing: tuple[float, float, float] | None = None  # resample to this voxel size (then pad to `multiple_of`)
    multiple_of: int = 128  # without spacing: resize each axis to the nearest multiple (reference)
    region: str | None = None  # body region/span given by the user instead of derived from labels
    modality: str = "ct"
    memory_gb: float | None = None  # budget for encode_within
    unmapped: str = "background"  # label ids outside the mapping: "background" or "error"

    def __post_init__(self):
        if self.multiple_of < 4 or self.multiple_of % 4:
            raise ValueError(f"multiple_of must be a positive multiple of 4 (the VAE's factor), got {self.multiple_of}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be 3 positive mm values, got {self.spacing}")
        if self.region is not None:
            parse_span(self.region)
        modality_code(self.modality)
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise ValueError(f"memory_gb must be positive (GB), got {self.memory_gb}")


@dataclass(frozen=True)
class Case:
    name: str
    image: Path  # NIfTI file or DICOM series folder
    label: Path | None = None


DATALIST_FILE = "datalist.json"  # written last into the output folder


def _stem(p: Path) -> str:
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _strip(name: str, suffixes: Sequence[str]) -> str | None:
    for s in suffixes:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return None


def discover(source: str | Path) -> list[Case]:
    """Cases of a folder (NIfTI files, `<name>_label.nii.gz` beside them or images/ + labels/ folders,
    DICOM series as sub-folders) or of a datalist JSON ({"training": [{"image", "label"?}]})."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such input: {source}")
    if source.is_file():
        return _from_datalist(source)
    sub = {p.name.lower(): p for p in source.iterdir() if p.is_dir()}
    img_dir = next((sub[k] for k in ("images", "imagestr", "image") if k in sub), None)
    lab_dir = next((sub[k] for k in ("labels", "labelstr", "label") if k in sub), None)
    if img_dir is not None:
        labels = {_stem(p): p for p in lab_dir.iterdir()} if lab_dir else {}
        cases = []
        for p in sorted(img_dir.iterdir()):
            if p.name.startswith("."):
                continue
            stem = _stem(p)
            base = _strip(stem, ("_0000",)) or stem
            cases.append(Case(base, p, labels.get(stem) or labels.get(base)))
        return cases
    files = [p for p in sorted(source.iterdir()) if not p.name.startswith(".")]
    labels = {}
    for p in files:
        base = _strip(_stem(p), LABEL_SUFFIXES) if is_nifti(p) else None
        if base is not None:
            labels[base] = p
    cases = []
    for p in files:
        if p in labels.values() or not (is_nifti(p) or p.is_dir()):
            continue
        stem = _stem(p)
        base = _strip(stem, IMAGE_SUFFIXES) or stem
        cases.append(Case(base, p, labels.get(stem) or labels.get(base)))
    if not cases:
        raise ValueError(f"{source}: no NIfTI files or DICOM series folders found")
    return cases


def _from_datalist(path: Path) -> list[Case]:
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON datalist ({e})") from e
    items = data.get("training", data.get("data")) if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected {{'training': [{{'image': ..., 'label': ...}}, ...]}} with entries")
    cases, seen = [], set()
    for k, e in enumerate(items):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str):
            raise ValueError(f"{path}: entry {k} has no 'image' path (a string)")
        if e.get("label") is not None and not isinstance(e["label"], str):
            raise ValueError(f"{path}: entry {k}: 'label' must be a path (a string), got {e['label']!r}")
        img = (path.parent / e["image"]).resolve()
        name = _strip(_stem(img), IMAGE_SUFFIXES) or _stem(img)
        if name in seen:
            name = f"{name}_{k}"
        seen.add(name)
        cases.append(Case(name, img, (path.parent / e["label"]).resolve() if e.get("label") else None))
    return cases


def check_cases(cases: Sequence[Case]) -> None:
    """Every image and label file checked (check_volume_file: readable, 3D, voxel size, orientation, finite
    voxels) before anything is written; all refused files are named at once."""
    problems = []
    for case in cases:
        for path in (case.image, case.label):
            if path is not None:
                try:
                    check_volume_file(path)
                except (ValueError, FileNotFoundError) as e:
                    problems.append(str(e))
    if problems:
        raise ValueError(f"{len(problems)} input file(s) refused before any work (fix or remove them):\n  "
                         + "\n  ".join(problems))


def foreign_ids(label: np.ndarray) -> str | None:
    """Why a label map's ids look like another numbering than MAISI's (a lesion mask, another atlas), or None:
    ids outside the vocabulary, only one or two organ ids, or region markers with a region missing between."""
    organs = sorted(int(i) for i in np.unique(label) if i not in (0, BODY))
    unknown = [i for i in organs if i not in id_to_name()]
    if unknown:
        return f"ids {unknown[:10]} are not MAISI ids"
    if 0 < len(organs) <= 2:
        return (f"only {len(organs)} distinct id(s), {', '.join(f'{i} (= {label_name(i)})' for i in organs)}, where a "
                f"MAISI label map names many organs")
    found = [k for k, r in enumerate(REGIONS) if set(REGION_MARKERS[r]) & set(organs)]
    gap = [REGIONS[k] for k in range(found[0], found[-1] + 1) if k not in found] if found else []
    if gap:
        return (f"marker organs of {', '.join(REGIONS[k] for k in found)} but none of {', '.join(gap)} between them, "
                f"which no scan shows")
    return None


def target_shape(shape: Sequence[int], multiple: int) -> tuple[int, ...]:
    """Nearest multiple of `multiple` per axis, at least one multiple (the reference's rounding)."""
    return tuple(int(max(round(s / multiple), 1) * multiple) for s in shape)


def resample(hu: np.ndarray, label: np.ndarray | None, affine: np.ndarray, cfg: PrepareConfig):
    """Window HU to [0,1] and resample with MONAI (trilinear image, nearest label); returns arrays + affine."""
    keys = ["image"] + (["label"] if label is not None else [])
    modes = ["trilinear", "nearest"][: len(keys)]
    aff = torch.as_tensor(affine, dtype=torch.float64)
    data = {"image": MetaTensor(torch.from_numpy(np.asarray(hu, np.float32)[None]), affine=aff)}
    if label is not None:
        data["label"] = MetaTensor(torch.from_numpy(label.astype(np.int16)[None]), affine=aff)
    steps: list[Callable] = [
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ScaleIntensityRanged(keys="image", a_min=HU_RANGE[0], a_max=HU_RANGE[1], b_min=0.0, b_max=1.0, clip=True),
    ]
    if cfg.spacing is not None:
        steps += [Spacingd(keys=keys, pixdim=cfg.spacing, mode=["bilinear", "nearest"][: len(keys)]),
                  DivisiblePadd(keys=keys, k=cfg.multiple_of, mode="constant", value=0)]
    else:
        size = target_shape(hu.shape, cfg.multiple_of)
        steps.append(Resized(keys=keys, spatial_size=size, mode=modes, anti_aliasing=False))
    out = Compose(steps)(data)
    image = out["image"]
    lab = out["label"][0].numpy().astype(np.uint8) if label is not None else None
    return image[0].numpy().astype(np.float32), lab, np.asarray(image.affine, dtype=np.float64)


def _read_label(path: Path) -> tuple[np.ndarray, np.ndarray]:
    vol = read_volume(path)
    arr = vol.array
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{path}: label map holds non-integer values")
        arr = arr.astype(np.int64)
    return arr, vol.affine


def check_pair(image_shape, image_affine, label_shape, label_affine, name: str) -> None:
    if tuple(image_shape) != tuple(label_shape):
        raise ValueError(f"{name}: image shape {list(image_shape)} and label shape {list(label_shape)} differ")
    tol = 1e-3 * max(1.0, float(np.abs(image_affine[:3, :3]).max()))
    if not np.allclose(image_affine[:3, :3], label_affine[:3, :3], atol=tol) or \
            not np.allclose(image_affine[:3, 3], label_affine[:3, 3], atol=max(tol, 0.05)):
        raise ValueError(f"{name}: image and label affines differ (different grids or orientation): "
                         f"{np.round(image_affine, 3).tolist()} vs {np.round(label_affine, 3).tolist()}")


def settings_of(cfg: PrepareConfig, encoder_id: str | None, encoder_sha256: str | None = None) -> dict[str, Any]:
    """What a prepared case depends on: the options, the encoder (its path) and its weights' sha256."""
    return {**asdict(cfg), "encoder": encoder_id, "encoder_sha256": encoder_sha256}


def outputs(out_dir: Path, name: str, with_latents: bool) -> dict[str, Path]:
    """Output files of a case; the sidecar sits beside the latent (or image) file, named after its stem."""
    kind = "latent" if with_latents else "image"
    paths = {"sidecar": out_dir / f"{name}_{kind}.json", "label": out_dir / f"{name}_label.nii.gz"}
    paths[kind] = out_dir / (f"{name}_latent.safetensors" if with_latents else f"{name}_image.nii.gz")
    return paths


def fingerprint(path: Path | None) -> list[int] | None:
    """[bytes, newest mtime in ns] of an input file or DICOM series folder: a changed input is prepared again."""
    if path is None:
        return None
    files = [f for f in path.iterdir() if f.is_file()] if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


def inputs_of(case: Case) -> dict[str, list[int] | None]:
    return {"image": fingerprint(case.image), "label": fingerprint(case.label)}


def is_done(out_dir: Path, case: Case, settings: dict, with_latents: bool) -> dict | None:
    """The sidecar of a finished case prepared with the same settings (the encoder's weights included) from the
    same, unchanged input files, else None (the sidecar is written last)."""
    paths = outputs(out_dir, case.name, with_latents)
    try:
        side = json.loads(paths["sidecar"].read_text())
    except (OSError, ValueError):
        return None
    if (side.get("settings") != json.loads(json.dumps(settings)) or side.get("source") != str(case.image)
            or side.get("inputs") != inputs_of(case)):
        return None
    return side if all(p.exists() for k, p in paths.items() if k != "sidecar") else None


def prepare_case(case: Case, out_dir: Path, cfg: PrepareConfig, encoder: Encoder | None = None,
                 encoder_id: str | None = None, mapping: dict | None = None,
                 names: dict[int, str] | None = None, *, encoder_sha256: str | None = None) -> dict:
    """Prepare one case; returns its sidecar (dim, spacing, region one-hots, modality, file names)."""
    vol = read_volume(case.image)
    hu = vol.array.astype(np.float32)
    notes = []
    if case.label is not None:
        label, laff = _read_label(case.label)
        check_pair(hu.shape, vol.affine, label.shape, laff, case.name)
        if mapping is not None or names is not None:
            label = convert_labels(label, mapping, names, unmapped=cfg.unmapped).label
        elif label.max() > 255 or label.min() < 0:
            raise ValueError(f"{case.name}: label ids must be 0..255 (MAISI ids); give a label mapping")
        elif (why := foreign_ids(label)) is not None:
            notes.append(f"{case.label}: the label ids look like another numbering than MAISI's ({why}); without a "
                         f"mapping they are read as MAISI ids, which also decide the body region. If the map has "
                         f"its own ids, give a JSON {{source id: MAISI name}} as label_mapping, or its class "
                         f"names as label_names")
            warnings.warn(notes[-1], LabelIdsWarning, stacklevel=2)
        label = label.astype(np.uint8)
        if not (label == BODY).any():
            label = add_body(label, hu)
    else:
        label = add_body(np.zeros(hu.shape, np.uint8), hu)
    if cfg.region is not None:
        top, bottom = parse_span(cfg.region)
    else:
        found = region_from_label(label)
        if found is None:
            raise ValueError(f"{case.name}: the label map shows no body-region marker organ (brain/skull, lungs, "
                             "abdominal organs, femurs); give region")
        top, bottom = found
    image, lab, affine = resample(hu, label, vol.affine, cfg)
    spacing = [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)]
    paths = outputs(out_dir, case.name, encoder is not None)
    write_volume(paths["label"], lab, affine, np.uint8)
    side: dict[str, Any] = {
        "dim": list(image.shape), "spacing": spacing,
        "top_region_index": _hot(top), "bottom_region_index": _hot(bottom),
        "region": span_name(top, bottom), "modality": cfg.modality, "label": paths["label"].name,
    }
    if encoder is not None:
        with torch.no_grad():
            x = torch.from_numpy(image)[None, None].to(_device_of(encoder))
            plan = encoder.plan_within("encode", tuple(x.shape), cfg.memory_gb)  # unsplit, split or streaming
            mu, sigma = encoder.encode_within(x, cfg.memory_gb, plan=plan)
            mu, sigma = mu.cpu(), sigma.cpu()
        side["latent"] = paths["latent"].name
        side["encode_plan"] = plan.describe()
        side["latent_shape"] = list(mu.shape[1:])
        save_latents(paths["latent"], mu[0], sigma[0], {k: json.dumps(v) for k, v in side.items()})
    else:
        write_volume(paths["image"], image * (HU_RANGE[1] - HU_RANGE[0]) + HU_RANGE[0], affine, np.int16)
        side["image"] = paths["image"].name
    side["source"], side["settings"] = str(case.image), settings_of(cfg, encoder_id, encoder_sha256)
    side["inputs"] = inputs_of(case)
    if notes:
        side["warnings"] = notes
    atomic_write_text(paths["sidecar"], json.dumps(side, indent=1) + "\n")
    return side


def save_latents(path: Path, mu: torch.Tensor, sigma: torch.Tensor, metadata: dict[str, str] | None = None) -> Path:
    """μ and σ (C×x×y×z, float32) in one safetensors file, atomically."""
    tensors = {"mu": mu.detach().float().contiguous().cpu(), "sigma": sigma.detach().float().contiguous().cpu()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata), suffix=".safetensors")


def datalist_entry(side: dict) -> dict:
    entry = {"image": side.get("latent", side.get("image")), "label": side["label"]}
    entry.update({k: side[k] for k in ("dim", "spacing", "top_region_index", "bottom_region_index", "modality")})
    return entry


def plan_cases(source: str | Path, out_dir: str | Path) -> list[Case]:
    """The cases of `source` once every input file has passed check_cases and `out_dir` can be created:
    everything that can be refused is refused here, before any network loads or any file is written."""
    out = Path(out_dir).resolve()
    cases = discover(source)
    if out != Path(source).resolve():  # an output folder inside the input folder: not our own earlier output
        cases = [c for c in cases if not c.image.resolve().is_relative_to(out)]
    if not cases:
        raise ValueError(f"{source}: no cases outside the output folder {out_dir}")
    check_cases(cases)
    check_output_dir(out_dir)
    inputs = {p.resolve() for c in cases for p in (c.image, c.label) if p is not None}
    if Path(source).is_file():
        inputs.add(Path(source).resolve())
    written = [p.resolve() for c in cases for kind in (True, False) for p in outputs(out, c.name, kind).values()]
    clash = sorted({str(p) for p in (*written, out / DATALIST_FILE) if p in inputs})
    if clash:
        raise ValueError(f"{out_dir}: preparing there would overwrite input files ({', '.join(clash[:3])}"
                         f"{' …' if len(clash) > 3 else ''}); give another output folder (out)")
    return cases


def prepare_all(source: str | Path | Sequence[Case], out_dir: str | Path, cfg: PrepareConfig,
                encoder: Encoder | None = None, encoder_id: str | None = None, mapping: dict | None = None,
                names: dict[int, str] | None = None, log: Callable[[str], None] | None = None, *,
                encoder_sha256: str | None = None) -> dict:
    """Prepare every case of `source` (a folder or datalist, checked by plan_cases; or the cases plan_cases
    returned). The output folder is created only after the checks; failures while preparing are recorded per
    case and the rest continues. Returns the report (warnings, e.g. foreign-looking label ids, per case too)."""
    out_dir = Path(out_dir)
    log = log or (lambda line: None)
    cases = plan_cases(source, out_dir) if isinstance(source, str | Path) else list(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(settings_of(cfg, encoder_id, encoder_sha256)))
    report: dict[str, Any] = {"done": [], "skipped": [], "failed": {}}
    entries = []
    for case in cases:
        side = is_done(out_dir, case, settings, encoder is not None)
        if side is not None:
            report["skipped"].append(case.name)
            log(f"{case.name}: already prepared, skipped")
        else:
            try:
                side = prepare_case(case, out_dir, cfg, encoder, encoder_id, mapping, names,
                                    encoder_sha256=encoder_sha256)
            except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
                report["failed"][case.name] = f"{type(e).__name__}: {e}"
                report.setdefault("traceback", {})[case.name] = traceback.format_exc(limit=3)
                log(f"{case.name}: FAILED: {e}")
                continue
            report["done"].append(case.name)
            if side.get("warnings"):
                report.setdefault("warnings", {})[case.name] = side["warnings"]
            plan = f"; encoded: {side['encode_plan']}" if "encode_plan" in side else ""
            log(f"{case.name}: {side['region']}, {side['dim']} voxels at "
                f"{[round(s, 3) for s in side['spacing']]} mm{plan}")
        entries.append(datalist_entry(side))
    atomic_write_text(out_dir / DATALIST_FILE, json.dumps({"training": entries}, indent=1) + "\n")
    atomic_write_text(out_dir / "prepare_report.json", json.dumps(report, indent=1) + "\n")
    return report



def _hot(i: int) -> list[int]:
    return [int(v) for v in region_one_hot(i)]


def _device_of(encoder: Encoder) -> torch.device:
    """The device of the encoder's weights (CPU for weightless encoders)."""
    params = getattr(encoder, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")
