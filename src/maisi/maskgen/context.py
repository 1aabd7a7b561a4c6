"""The size context of the mask UNet: validating a request and completing it from a conditions file
(`all_anatomy_size_conditions.json`: a list of {"organ_size": [10 sizes], ...}), REFERENCE §8."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# The context slots, in order (the reference's anatomy_size_idx).
ANATOMY_SIZE_NAMES: tuple[str, ...] = (
    "gallbladder", "liver", "stomach", "pancreas", "colon",
    "lung tumor", "pancreatic tumor", "hepatic tumor", "colon cancer primaries", "bone lesion",
)
TUMOR_LABELS: dict[str, int] = {  # tumour slots → MAISI label ids
    "lung tumor": 23, "pancreatic tumor": 24, "hepatic tumor": 26, "colon cancer primaries": 27, "bone lesion": 128,
}
DONT_CARE = -1.0
MAX_ENTRIES = len(ANATOMY_SIZE_NAMES)
CONDITIONS_KEY = "organ_size"
CONDITIONS_FILE = "all_anatomy_size_conditions.json"  # the released name (NV-Generate-CT datasets/)
VOLUME_KEY = "organ_volume_ml"  # this project's addition to the released layout: each map's measured volumes (mL)

Request = Mapping[str, float] | Sequence[tuple[str, float]]


class AnatomySizeError(ValueError):
    """A size request that cannot be met; `field` names the entry (or "anatomy_size" for the whole request)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"anatomy_size[{field!r}]: {message}" if field != "anatomy_size" else f"anatomy_size: {message}")
        self.field = field


def canonical_name(name: str) -> str:
    """Lower case, '_' as ' ', British 'tumour' as 'tumor': "Hepatic_Tumour" → "hepatic tumor"."""
    return " ".join(str(name).strip().lower().replace("_", " ").replace("tumour", "tumor").split())


def check_request(request: Request) -> dict[str, float]:
    """A request as {slot name: size}, in the order given, every rule checked before any compute:
    known names, no duplicates, at most 10 entries, sizes in [0, 1] or −1, at most one tumour named."""
    items = list(request.items()) if isinstance(request, Mapping) else list(request)
    if len(items) > MAX_ENTRIES:
        raise AnatomySizeError("anatomy_size", f"at most {MAX_ENTRIES} entries, got {len(items)}")
    out: dict[str, float] = {}
    for item in items:
        if not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2:
            raise AnatomySizeError("anatomy_size", f"each entry must be a (name, size) pair, got {item!r}")
        raw, value = item
        name = canonical_name(raw)
        if name not in ANATOMY_SIZE_NAMES:
            close = difflib.get_close_matches(name, ANATOMY_SIZE_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise AnatomySizeError(str(raw), f"unknown structure{hint}; allowed: {', '.join(ANATOMY_SIZE_NAMES)}")
        if name in out:
            raise AnatomySizeError(str(raw), f"given twice; give each of {', '.join(ANATOMY_SIZE_NAMES)} at most once")
        out[name] = _check_size(str(raw), value)
    tumors = [n for n in out if n in TUMOR_LABELS]
    if len(tumors) > 1:
        raise AnatomySizeError(tumors[1], f"at most one tumour per request, got {', '.join(tumors)}")
    return out


def _check_size(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise AnatomySizeError(field, f"size must be a number in [0, 1] or -1 (don't care), got {value!r}")
    size = float(value)
    if size != DONT_CARE and not (math.isfinite(size) and 0.0 <= size <= 1.0):
        raise AnatomySizeError(field, f"size must be in [0, 1] or -1 (don't care), got {value!r}")
    return size


def load_conditions(path: str | Path) -> np.ndarray:
    """The size vectors of a conditions file as a K×10 float array; a wrong layout raises naming it."""
    return load_condition_table(path)[0]


def load_condition_table(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(K×10 sizes, K×10 volumes in mL or None) of a conditions file: the volumes are there when every entry has
    "organ_volume_ml" (files `maisi prepare --anatomy-conditions` writes; NVIDIA's have none)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no conditions file at {path} (all_anatomy_size_conditions.json layout)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of {{\"{CONDITIONS_KEY}\": [...]}} entries")
    rows = []
    for i, entry in enumerate(data):
        size = entry.get(CONDITIONS_KEY) if isinstance(entry, dict) else None
        if not isinstance(size, list) or len(size) != MAX_ENTRIES:
            raise ValueError(f"{path}: entry {i} needs \"{CONDITIONS_KEY}\": a list of {MAX_ENTRIES} sizes, got {entry!r}")
        rows.append([float(v) for v in size])
    volumes = [e.get(VOLUME_KEY) for e in data]
    has_volumes = all(isinstance(v, list) and len(v) == MAX_ENTRIES for v in volumes)
    return (np.asarray(rows, dtype=np.float64),
            np.asarray(volumes, dtype=np.float64) if has_volumes else None)


def complete_context(request: Request, conditions: np.ndarray) -> tuple[float, ...]:
    """The full 10-vector for a request: the conditions row nearest (L1 over the requested slots, −1 included,
    first row on ties) with the requested sizes written over it, as the reference does."""
    sizes = check_request(request)
    table = np.asarray(conditions, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != MAX_ENTRIES or len(table) == 0:
        raise ValueError(f"conditions must be a non-empty K×{MAX_ENTRIES} array, got shape {table.shape}")
    slots = [ANATOMY_SIZE_NAMES.index(n) for n in sizes]
    wanted = np.array(list(sizes.values()), dtype=np.float64)
    distance = np.abs(table[:, slots] - wanted).sum(axis=1) if slots else np.zeros(len(table))
    context = table[int(np.argmin(distance))].copy()
    context[slots] = wanted
    return tuple(float(v) for v in context)


def target_tumor(context: Sequence[float], requested: Mapping[str, float] | None = None) -> int | None:
    """The label id of the tumour asked for: the one the request names (not −1), else the last tumour slot of the
    context that is not −1 (a completed row may hold several), else None."""
    named = [TUMOR_LABELS[n] for n, v in (requested or {}).items() if n in TUMOR_LABELS and v != DONT_CARE]
    if named:
        return named[0]
    found = [TUMOR_LABELS[n] for n, v in zip(ANATOMY_SIZE_NAMES, context) if n in TUMOR_LABELS and v != DONT_CARE]
    return found[-1] if found else None
