"""Plain JSON data from the project's values: the one converter used by records, reports and checkpoints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def jsonable(v: Any) -> Any:
    """`v` as plain JSON data: dataclasses to dicts, tuples and sets (sorted) to lists, paths to str,
    arrays and tensors to (nested) lists or numbers, numpy scalars to Python, non-finite floats to None."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return jsonable(dataclasses.asdict(v))
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | frozenset | set):
        return [jsonable(x) for x in (sorted(v) if isinstance(v, frozenset | set) else v)]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, torch.Tensor):
        return jsonable(v.item() if v.numel() == 1 else v.tolist())
    if isinstance(v, np.ndarray | np.generic):
        return jsonable(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
