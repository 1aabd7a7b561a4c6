"""The JSON record of one generated sample: every input, seed, model and version needed to reproduce it."""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy
import torch

from maisi import __version__
from maisi.io.atomic import atomic_write_text
from maisi.io.jsondata import jsonable
from maisi.pipeline.validation import SEED_BITS


def environment() -> dict[str, str]:
    return {"maisi": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


SEED_RULE = f"attempt a uses seed + a * 2**{SEED_BITS} (attempt 0: the sample's seed); a database mask: the a-th ranked"


def failed_organs(quality: dict) -> dict[str, dict]:
    """The organs that failed a quality check: {organ: {"median_hu", "range"}}."""
    return {name: {"median_hu": o["median_hu"], "range": o["range"]}
            for name, o in quality.get("organs", {}).items() if o.get("passed") is False}


def sample_record(*, index: int, seed: int, image_seed: int, plan: Any, model: dict, mask: dict | None,
                  quality: dict, attempts: list[dict], files: dict[str, str], device: str,
                  seconds: float) -> dict[str, Any]:
    """Everything that made sample `index` (plan = the resolved request, model = weights + sha256);
    `image_seed` is the seed of the attempt kept (the last), every attempt is listed in `attempts`."""
    return jsonable({
        "sample": index,
        "seed": seed,
        "image_seed": image_seed,
        "seed_rule": SEED_RULE,
        "request": plan.request,
        "resolved": {
            "size": plan.size, "spacing": plan.spacing, "body_region": plan.regions, "modality": plan.modality,
            "steps": plan.steps, "sampler": plan.sampler, "timesteps": plan.timesteps, "guidance": plan.guidance,
            "anatomy": plan.anatomy, "tumors": plan.tumors, "use_mask": plan.use_mask,
            "mask_database": plan.mask_database,
            "anatomy_size": None if plan.size_control is None else {
                "requested": plan.size_control.requested, "completed": plan.size_control.context,
                "conditions": plan.size_control.conditions},
        },
        "warnings": plan.warnings,
        "model": model,
        "mask": mask,
        "quality": quality,
        "attempts": attempts,
        "files": files,
        "device": device,
        "seconds": round(seconds, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
    })


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(record, indent=2) + "\n")
