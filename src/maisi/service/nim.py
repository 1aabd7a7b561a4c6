"""The NIM's run payload (plus maisi's superset fields) and its mapping to a `GenerationRequest`."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maisi.io.formats import DEFAULT_EXT
from maisi.labels import REGIONS, region_index
from maisi.maskgen.context import check_request as check_anatomy_sizes
from maisi.pipeline.validation import GenerationRequest

# The NIM's body regions → maisi's four (REFERENCE §3): "lower" (below the pelvis) has no region of its own.
NIM_REGIONS: dict[str, str] = {"head": "head_neck", "chest": "chest", "thorax": "chest", "abdomen": "abdomen",
                               "pelvis": "pelvis", "lower": "pelvis"}
# The NIM's grid limits: x, y in a few sizes, z in 128..768 (steps of 128), every spacing in 0.5..5.0 mm.
NIM_XY_SIZES = (256, 384, 512)
NIM_Z_RANGE = (128, 768, 128)
NIM_SPACING = (0.5, 5.0)
# Whether GenerationRequest takes `anatomy_size` (the mask generation model in the pipeline): then
# controllable_anatomy_size goes to the library, whose plan says whether the served weights can meet it.
PIPELINE_SIZES = "anatomy_size" in {f.name for f in fields(GenerationRequest)}


class NotSupportedError(ValueError):
    """A valid request that this server cannot serve yet (answered 422, naming the field)."""


class RunPayload(BaseModel):
    """`POST /v1/maisi/run` and `POST /v1/jobs`: the NIM's fields, then maisi's. Strict types: "1" or true is not
    a count and "no" is not false (a number without a fraction still fills a float field, e.g. spacing)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    # the NIM's fields
    num_output_samples: int
    body_region: list[str]
    anatomy_list: list[str] = []
    output_size: list[int] | None = None  # None: the model's default grid
    spacing: list[float] | None = None
    controllable_anatomy_size: list[tuple[str, float]] = []
    pre_signed_url: str | None = None
    local_working_dir: str | None = None
    image_output_ext: str = DEFAULT_EXT
    label_output_ext: str = DEFAULT_EXT
    # maisi's superset
    seed: int = 0
    steps: int | None = None
    tumor: list[str] = Field(default=[], alias="tumour")
    modality: str | int | None = None
    precision: str | None = None  # None: the server's
    memory_gb: float | None = None
    quality_check: bool = True
    mask_mapping: dict[str, str | int] | None = None  # with an uploaded mask: {your name or id: MAISI name or id}


def parse_payload(data: bytes | str | dict[str, Any]) -> RunPayload:
    """The payload, or ValueError naming every field that is missing or of the wrong type. A dict is judged as the
    JSON body it stands for (strict mode takes a JSON array, not a Python list, for a tuple)."""
    try:
        return RunPayload.model_validate_json(json.dumps(data) if isinstance(data, dict) else data)
    except ValidationError as e:
        raise ValueError(describe_errors(e)) from None


def describe_errors(error: ValidationError) -> str:
    """'num_output_samples: Field required; spacing.1: Input should be a valid number, got "8"' from pydantic."""
    parts = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        if err["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown field (see GET /v1/maisi/info for the fields)")
        elif err["type"].endswith("_type"):  # a value of the wrong JSON type: show it as the client sent it
            parts.append(f"{where}: {err['msg']}, got {json.dumps(err['input'])[:40]}")
        else:
            parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def nim_span(names: list[str]) -> tuple[str, ...]:
    """The (top, bottom) maisi regions covering a NIM body_region list (maisi's own names work too)."""
    if not names:
        raise ValueError(f"body_region needs at least one of {', '.join(NIM_REGIONS)}")
    found = []
    for name in names:
        key = str(name).strip().lower()
        try:
            found.append(REGIONS.index(NIM_REGIONS[key]) if key in NIM_REGIONS else region_index(key))
        except ValueError:
            raise ValueError(f"body_region {name!r} is not a body region; use {', '.join(NIM_REGIONS)} "
                             f"(or maisi's {', '.join(REGIONS)})") from None
    top, bottom = min(found), max(found)
    return (REGIONS[top],) if top == bottom else (REGIONS[top], REGIONS[bottom])


def check_nim_grid(size: list[int] | None, spacing: list[float] | None) -> None:
    """The NIM's output_size and spacing limits (for NVIDIA's CT networks, whose grids they are)."""
    if size is not None:
        lo, hi, step = NIM_Z_RANGE
        if len(size) != 3 or any(s not in NIM_XY_SIZES for s in size[:2]) or not (
                lo <= size[2] <= hi and size[2] % step == 0):
            raise ValueError(f"output_size {size}: x and y must be in {list(NIM_XY_SIZES)} and z in {lo}..{hi} "
                             f"in steps of {step}")
    if spacing is not None:
        lo, hi = NIM_SPACING
        if len(spacing) != 3 or any(not (math.isfinite(s) and lo <= s <= hi) for s in spacing):
            raise ValueError(f"spacing {spacing}: three values, each in {lo}..{hi} mm")


def to_request(p: RunPayload, *, max_samples: int, nim_limits: bool, mask: str | None = None,
               mask_mapping: str | None = None) -> GenerationRequest:
    """The `GenerationRequest` of a payload; the NIM-level rules are checked here, the model's by `plan`
    (pre_signed_url and local_working_dir are the service's, checked by `outputs.check_delivery`)."""
    if not 1 <= p.num_output_samples <= max_samples:
        raise ValueError(f"num_output_samples must be in 1..{max_samples} on this server, got {p.num_output_samples}")
    for name, values in (("output_size", p.output_size), ("spacing", p.spacing)):
        if values is not None and len(values) != 3:
            raise ValueError(f"{name} takes 3 values (x, y, z), got {len(values)}: {values}")
    if nim_limits:
        check_nim_grid(p.output_size, p.spacing)
    sizes = tuple((name, size) for name, size in p.controllable_anatomy_size)
    if sizes:
        check_anatomy_sizes(sizes)  # a malformed request says so first
        if not PIPELINE_SIZES:
            raise NotSupportedError("controllable_anatomy_size is not supported yet: this maisi's pipeline has no "
                                    "mask generation model wired in; leave it out (masks come from the mask "
                                    "database or your upload)")
    if p.mask_mapping is not None and mask is None:
        raise ValueError("mask_mapping needs an uploaded mask (multipart field 'mask')")
    return GenerationRequest(
        body_region=nim_span(p.body_region) if mask is None or p.body_region else (),
        size=None if p.output_size is None else tuple(p.output_size),
        spacing=None if p.spacing is None else tuple(p.spacing),
        modality=p.modality, num_samples=p.num_output_samples, seed=p.seed, steps=p.steps,
        anatomy=tuple(p.anatomy_list), mask=mask, mask_mapping=mask_mapping, tumor=tuple(p.tumor),
        memory_gb=p.memory_gb, quality_check=p.quality_check,
        image_output_ext=p.image_output_ext, label_output_ext=p.label_output_ext,
        **({"anatomy_size": sizes} if sizes else {}),
    )


def request_to_json(request: GenerationRequest) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(request)))  # tuples become lists


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def request_from_json(data: dict[str, Any]) -> GenerationRequest:
    return GenerationRequest(**{k: _tuples(v) for k, v in data.items()})
