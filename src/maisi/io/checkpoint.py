"""Checkpoints, safe by construction: the project's folder format and NVIDIA's released .pt files.

Nothing here unpickles code: `.pt` files go through `torch.load(weights_only=True)` and the project's
own format is `config.json` + `model.safetensors`. Every load checks keys and shapes strictly and
names what does not fit.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from maisi import __version__
from maisi.config import MaskGenConfig, ModelConfig, from_dict, to_dict
from maisi.io.atomic import atomic_path, atomic_write_text
from maisi.io.digest import sha256_file
from maisi.io.jsondata import jsonable

FORMAT = "maisi-checkpoint"
FORMAT_VERSION = 1
COMPONENTS = ("autoencoder", "unet", "controlnet")
MASK_COMPONENTS = ("mask_autoencoder", "mask_unet")  # the mask generation model (maisi.maskgen: MaskGenConfig)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Keys of NVIDIA's released checkpoint dicts that hold the weights of each component.
RELEASED_KEYS = {"unet": "unet_state_dict", "controlnet": "controlnet_state_dict"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is not a checkpoint, or does not fit the model."""


def _check_component(component: str) -> None:
    if component not in COMPONENTS + MASK_COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose one of {list(COMPONENTS + MASK_COMPONENTS)}")


def _config_class(component: str) -> type:
    """The config dataclass a checkpoint of `component` stores: ModelConfig, or MaskGenConfig for the mask model."""
    if component in MASK_COMPONENTS:
        return MaskGenConfig
    return ModelConfig


# ---------------------------------------------------------------------------------------------
# The project's format: <folder>/config.json + <folder>/model.safetensors
# ---------------------------------------------------------------------------------------------


def save_pretrained(
    folder: str | Path,
    model: nn.Module,
    config: Any,
    component: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model`'s weights and the config that builds it. Both files are written atomically; the
    weights first, then config.json, which records the weights' sha256 so a mismatched pair is caught."""
    _check_component(component)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "component": component})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "maisi_version": __version__,
        "component": component,
        "weights_sha256": sha256_file(folder / WEIGHTS_FILE),
        "config": to_dict(config),
        "extra": jsonable(extra or {}),
    }
    atomic_write_text(folder / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return folder


def read_pretrained_config(folder: str | Path) -> tuple[str, Any, dict[str, Any], dict[str, Any]]:
    """(component, config, extra, raw metadata) of a project checkpoint folder, without loading weights; the
    config is a ModelConfig, or a MaskGenConfig for the mask model's components."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {folder} (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: missing {CONFIG_FILE}; not a maisi checkpoint folder")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: not a maisi checkpoint config (no \"format\": \"{FORMAT}\")")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: written by a newer maisi (format {meta['format_version']}); upgrade maisi"
        )
    component = meta.get("component")
    _check_component(component)
    try:
        config = from_dict(_config_class(component), meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: invalid model config ({e})") from e
    extra = dict(meta.get("extra", {}))
    check_scale_factor(extra, str(cfg_path))
    return component, config, extra, meta


def check_scale_factor(extra: dict[str, Any], source: str) -> None:
    """A recorded scale_factor (latents are multiplied by it before the UNet) must be a finite number > 0;
    anything else fails only after sampling, so it is refused when the file is read."""
    if "scale_factor" not in extra:
        return
    value = extra["scale_factor"]
    try:
        ok = math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError, RuntimeError):  # not one number
        ok = False
    if not ok:
        raise CheckpointError(f"{source}: scale_factor is {value!r}; it must be a finite number > 0 (1/std of the "
                              f"training latents): the file is damaged or comes from a diverged run")


# ---------------------------------------------------------------------------------------------
# Reading any weights file safely
# ---------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a .pt state dict (plain or NVIDIA's released dicts)."""
    obj = read_checkpoint_file(path)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path}: not a plain state dict; use load_released for NVIDIA's checkpoint dicts")


def read_checkpoint_file(path: str | Path) -> Any:
    """The content of a .safetensors or .pt file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise CheckpointError(f"{path}: file is empty or truncated ({path.stat().st_size} bytes)")
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (a pickle before 1.6)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint or safetensors file (it starts with {head[:8]!r}); "
                              "give a .pt file written by torch.save or a .safetensors file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).lower()  # an unknown GLOBAL (a class or function to import) is code; a bad opcode is junk
        if "weights only load failed" in detail and ("global" in detail or "class" in detail):
            raise CheckpointError(
                f"{path}: refused to load: the file holds pickled objects other than tensors and plain "
                f"containers (it could run code). Re-save it as a plain state dict{_blocked_global(e)}"
            ) from e
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {_first_line(e)}") from e
    except Exception as e:  # the unpickler raises many types (KeyError, EOFError, RuntimeError…) on junk
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (corrupt, truncated or another kind of file): "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e


def _blocked_global(e: BaseException) -> str:
    """'; it imports posix.system' from the weights-only unpickler's message (whose first line advises loading
    with weights_only=False, which is exactly what must not be done with such a file), without terminal codes."""
    found = re.search(r"GLOBAL ([\w.]+)", re.sub(r"\x1b\[[0-9;]*m", "", str(e)))
    return f"; it imports {found[1]}" if found else ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def split_released(obj: Any, component: str, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, extra) from one of NVIDIA's released layouts (REFERENCE §1): a raw state dict
    (autoencoder), {"unet_state_dict", "scale_factor", ...} or {"controlnet_state_dict", ...}."""
    _check_component(component)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    key = RELEASED_KEYS.get(component)
    if key and key in obj:
        state = obj[key]
        extra = {k: v for k, v in obj.items() if k != key}
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, extra = obj, {}
    else:
        found = sorted(k for k in obj if not isinstance(obj[k], torch.Tensor))
        raise CheckpointError(
            f"{source}: no {component} weights found: expected a raw state dict"
            + (f" or a dict with {key!r}" if key else "")
            + f"; found keys {found[:10]}"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: {key or 'state dict'} does not hold tensors only")
    extra = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in extra.items()}
    check_scale_factor(extra, source)
    return state, extra


# ---------------------------------------------------------------------------------------------
# Strict key check
# ---------------------------------------------------------------------------------------------


def state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape mismatches as 'key: file (shape) vs model (shape)')."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    return missing, unexpected, shapes


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> list[str]:
    """Load with every key and shape checked. Known historical renames are applied first by the model's
    own `upgrade_state_dict(state) -> (state, notes)` when it has one; the notes are returned and warned."""
    notes: list[str] = []
    upgrade = getattr(model, "upgrade_state_dict", None)
    if callable(upgrade):
        state, notes = upgrade(dict(state))
        for note in notes:
            warnings.warn(f"{source}: {note}", stacklevel=2)
    missing, unexpected, shapes = state_dict_mismatch(model, state)
    if missing or unexpected or shapes:
        def show(name: str, items: list[str]) -> str:
            more = f" … and {len(items) - 12} more" if len(items) > 12 else ""
            return f"\n  {name} ({len(items)}): " + ", ".join(items[:12]) + more if items else ""

        raise CheckpointError(
            f"{source} does not fit {type(model).__name__} "
            f"(is the config/preset the one these weights were trained with?)"
            + show("missing in file", missing)
            + show("unexpected in file", unexpected)
            + show("shape mismatch", shapes)
        )
    model.load_state_dict(state, strict=True)
    return notes
