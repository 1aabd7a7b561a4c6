"""One loader for every way of naming weights: released sets, NVIDIA's .pt files, maisi folders, training runs.

A weights spec is one item or several of: a released-set name (`rflow-ct`, found in the Hugging Face
download cache), a released `.pt` file, a maisi checkpoint folder (`config.json` + `model.safetensors`),
a model folder (`autoencoder/`, `unet/`, `controlnet/`, optional `generation.json`), a training run folder
(its `export/`) or a folder of run folders; None is the demo model shipped in the package.
`resolve(spec)` says which file holds which network without loading any weights; `load_component` loads one.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from torch import nn

from maisi.config import ModelConfig, load_model_config, to_dict
from maisi.io.checkpoint import (
    CONFIG_FILE,
    MASK_COMPONENTS,
    read_pretrained_config,
)
from maisi.io.digest import sha256_file
from maisi.io.hub import SETS as HUB_SETS
from maisi.io.hub import MissingFilesError, local_set
from maisi.networks import load_pretrained, load_released

# The sets of maisi.io.hub that hold a diffusion model ("all" aside); each set's name is also the preset of its files.
SETS = tuple(n for n, s in HUB_SETS.items() if n != "all" and any(f.component == "unet" for f in s.files))
# The sets of the mask generation model alone (mask-ct): given beside an image set, e.g. `rflow-ct mask-ct`.
MASK_SETS = tuple(n for n, s in HUB_SETS.items() if n != "all" and n not in SETS
                  and any(f.component == "mask_unet" for f in s.files))
# The mask model's files and its conditions file: loaded with a set that holds them when they are in the cache.
MASK_MODEL_FILES = ("models/mask_generation_autoencoder.pt", "models/mask_generation_diffusion_unet.pt",
                    "datasets/all_anatomy_size_conditions.json")
DEFAULT_PRESET = "rflow-ct"  # architecture of a released file whose name and set say nothing
# NVIDIA's released files: the network each holds and the sets (presets) it belongs to (REFERENCE §1, §7;
# the brain-MR model decodes with the CT autoencoder).
RELEASED_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "autoencoder_v1.pt": ("autoencoder", ("rflow-ct", "ddpm-ct", "rflow-mr-brain")),
    "autoencoder_v2.pt": ("autoencoder", ("rflow-mr",)),
    "diff_unet_3d_rflow-ct.pt": ("unet", ("rflow-ct",)),
    "diff_unet_3d_ddpm-ct.pt": ("unet", ("ddpm-ct",)),
    "diff_unet_3d_rflow-mr.pt": ("unet", ("rflow-mr",)),
    "diff_unet_3d_rflow-mr-brain_v1.pt": ("unet", ("rflow-mr-brain",)),
    # the mask generation model (maisi.maskgen; REFERENCE §8): no image preset
    "mask_generation_autoencoder.pt": ("mask_autoencoder", ()),
    "mask_generation_diffusion_unet.pt": ("mask_unet", ()),
}
RELEASED_CONTROLNET = re.compile(r"controlnet_3d_(?P<preset>.+)\.pt")
# The config parts a checkpoint of each component depends on (a ControlNet copies the UNet's encoder).
PARTS = {"autoencoder": ("autoencoder",), "unet": ("unet",), "controlnet": ("unet", "controlnet")}
LABELS = {"autoencoder": "VAE", "unet": "diffusion UNet", "controlnet": "ControlNet",
          "mask_autoencoder": "mask autoencoder", "mask_unet": "mask diffusion UNet"}
DEFAULTS_FILE = "generation.json"  # optional defaults of a model folder: size, spacing, body_region
EXPORT_DIR, RUN_FILE = "export", "run.json"  # the run-folder layout `maisi train` writes (training/loop.py)
ACCEPTED = (f"a released set ({', '.join(SETS + MASK_SETS)}), NVIDIA's .pt files, a maisi checkpoint or model folder "
            "(autoencoder/, unet/, controlnet/, mask_autoencoder/, mask_unet/), or a training run folder (with export/)")


@dataclass(frozen=True)
class Source:
    """Where one network's weights are and what they are."""

    path: Path
    format: str  # "maisi" (config.json + model.safetensors) or "released" (NVIDIA's .pt)
    config: ModelConfig | None = None  # maisi: the config saved beside the weights (None for the mask model's)
    sha256: str = ""  # maisi: as config.json records it (released files are hashed when loaded)
    presets: tuple[str, ...] = ()  # released: the presets whose architecture the file has, from its name
    # maisi: read_pretrained_config's answer, kept so that loading does not read config.json a second time
    saved: tuple[str, Any, dict[str, Any], dict[str, Any]] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class WeightSources:
    """What a weights spec names: component -> Source, a model folder's defaults, the released set if any."""

    components: dict[str, Source]
    defaults: dict[str, Any] = field(default_factory=dict)
    set_name: str | None = None
    preset: str | None = None  # architecture of the released files (set or file names); None: not known
    spec: str = ""  # what was given, for messages

    @property
    def paths(self) -> dict[str, Path]:
        return {c: s.path for c, s in self.components.items()}

    @property
    def released(self) -> bool:
        """Whether the image networks are NVIDIA's files (the mask model's do not count)."""
        return any(s.format == "released" for c, s in self.components.items() if c not in MASK_COMPONENTS)

    def only(self, *components: str) -> WeightSources:
        """These components alone; an error naming the spec when one is not there."""
        missing = [c for c in components if c not in self.components]
        if missing:
            held = ", ".join(self.components) or "nothing"
            raise ValueError(f"{self.spec}: no {' or '.join(LABELS[c] for c in missing)} weights there "
                             f"(it holds: {held})")
        return replace(self, components={c: self.components[c] for c in components})

    def config(self, config: ModelConfig | str | Path | None = None) -> ModelConfig:
        """The model config these networks share, every maisi checkpoint checked against it: `config` (a
        ModelConfig, preset name or JSON file) when given; else the config saved with the maisi UNet (or
        another maisi checkpoint); else the released files' preset (rflow-ct when nothing names one)."""
        # the maisi checkpoints, the UNet's first: the other networks are built around it
        own = [(c, s) for c, s in sorted(self.components.items(), key=lambda cs: cs[0] != "unet") if s.config]
        if config is not None:
            cfg, origin = (config if isinstance(config, ModelConfig) else load_model_config(config)), None
        elif own:
            cfg, origin = own[0][1].config, own[0][1].path
        else:
            cfg, origin = load_model_config(self.preset or DEFAULT_PRESET), None
        for comp, src in own:
            for part in PARTS[comp]:
                if to_dict(getattr(src.config, part)) != to_dict(getattr(cfg, part)):
                    raise ValueError(
                        f"{src.path}: its {part} config does not match "
                        + (f"that of {origin}; give networks trained together" if origin else
                           "the given config; leave the config out to use the checkpoint's, or give the one "
                           "these weights were trained with"))
        return cfg


@dataclass
class Loaded:
    """One loaded network (eval mode), the config it was built with, its file's extras and its source."""

    model: nn.Module
    config: ModelConfig
    extra: dict[str, Any]
    source: dict[str, str]  # {"path", "sha256", "format"}


Spec = str | Path | Sequence[str | Path] | WeightSources | None


def demo_model_dir() -> Path:
    """The small model shipped in the package (trained by the project on phantoms)."""
    return Path(str(resources.files("maisi.resources").joinpath("demo_model")))


def resolve(spec: Spec, *, component: str | None = None, revision: str | Mapping[str, str] | None = None,
            cache_dir: str | Path | None = None) -> WeightSources:
    """Which file holds which network, without loading weights. `component` keeps that network alone
    (an error when the spec has none); `revision` and `cache_dir` apply to released-set names."""
    if isinstance(spec, WeightSources):
        sources = spec
    else:
        if spec is None:
            spec = demo_model_dir()
            if not (spec / "unet").is_dir():
                raise FileNotFoundError(f"the demo model is missing from the installation ({spec}); "
                                        f"give weights: {ACCEPTED}")
        items = [spec] if isinstance(spec, str | Path) else list(spec)
        if not items:
            raise ValueError(f"no weights given; give {ACCEPTED}")
        sources = merge(*(_resolve_one(item, component, revision, cache_dir) for item in items))
    return sources.only(component) if component else sources


def merge(*parts: WeightSources) -> WeightSources:
    """Several specs as one: each network given once, one released set at most, one preset."""
    found: dict[str, Source] = {}
    for part in parts:
        for comp, src in part.components.items():
            _add(found, comp, src, "given")
    set_names = sorted({p.set_name for p in parts if p.set_name})
    if len(set_names) > 1:
        raise ValueError(f"two released sets given: {' and '.join(set_names)}; give one")
    defaults = next((p.defaults for p in parts if p.defaults), {})
    return WeightSources(found, dict(defaults), set_names[0] if set_names else None,
                         _released_preset(found, set_names[0] if set_names else None),
                         " ".join(p.spec for p in parts))


def load_component(spec: Spec, component: str, config: ModelConfig | str | Path | None = None,
                   device: str = "cpu") -> Loaded:
    """Load one network from any spec (see `resolve`); `config` overrides the checkpoint's or preset's and
    must then fit a maisi checkpoint."""
    sources = resolve(spec, component=component)
    src = sources.components[component]
    cfg = sources.config(config)
    if src.format == "maisi":
        model, _, extra = load_pretrained(src.path, map_location=device, saved=src.saved)
        digest = src.sha256
    else:
        model, extra = load_released(src.path, component, cfg, map_location=device)
        digest = sha256_file(src.path)
    return Loaded(model.eval(), cfg, extra, {"path": str(src.path), "sha256": digest, "format": src.format})


# ---------------------------------------------------------------------------------------------
# One item of a spec
# ---------------------------------------------------------------------------------------------


def _resolve_one(item: str | Path, component: str | None, revision: str | Mapping[str, str] | None,
                 cache_dir: str | Path | None) -> WeightSources:
    path = Path(item)
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        return _from_file(path)
    if str(item) in SETS + MASK_SETS:  # an existing file or folder of the same name wins
        return _from_set(str(item), revision, cache_dir)
    close = difflib.get_close_matches(path.name, SETS + MASK_SETS, n=1)
    label = f"{LABELS[component]} " if component else ""
    raise FileNotFoundError(f"weights not found: no {label}checkpoint at {item}"
                            + (f"; did you mean the released set {close[0]!r}?" if close else "")
                            + f" (give {ACCEPTED})")


def _from_set(name: str, revision: str | Mapping[str, str] | None, cache_dir: str | Path | None) -> WeightSources:
    """The set's image networks, which must be in the cache (the mask database need not be); and its mask model
    with the conditions file, required for a mask set (mask-ct), else added only when every file is cached.
    Whatever is returned is verified against the manifest (`local_set`)."""
    held = {f.path for f in HUB_SETS[name].files}
    networks = [p for p in sorted(held) if (kind := _released_kind(PurePosixPath(p).name)) and name in kind[1]]
    mask = list(MASK_MODEL_FILES) if set(MASK_MODEL_FILES[:2]) <= held else []  # rflow-ct: the conditions alone
    files = local_set(name, revision=revision, cache_dir=cache_dir, only=networks) if networks else {}
    if mask:
        try:
            files |= local_set(name, revision=revision, cache_dir=cache_dir, only=mask)
        except MissingFilesError:
            if not networks:  # mask-ct: its files are what was asked for
                raise
    found: dict[str, Source] = {}
    for rel, local in sorted(files.items()):
        if kind := _released_kind(PurePosixPath(rel).name):  # the conditions file is found beside the mask UNet
            _add(found, kind[0], Source(Path(local), "released", presets=kind[1]), f"in the released set {name}")
    if not found:
        raise ValueError(f"the released set {name} holds no network file: {sorted(files)}")
    if not networks:  # a mask model alone names no image architecture
        return WeightSources(found, spec=name)
    return WeightSources(found, set_name=name, preset=name, spec=name)


def _from_file(path: Path) -> WeightSources:
    component, presets = _released_kind(path.name) or _guess_kind(path.name)
    found = {component: Source(path, "released", presets=presets)}
    return WeightSources(found, preset=_released_preset(found, None), spec=str(path))


def _from_folder(folder: Path) -> WeightSources:
    """A checkpoint folder, a run folder (its export), or a folder of those (model folder, folder of runs)."""
    for cand in (folder, folder / EXPORT_DIR):
        if _is_checkpoint(cand):
            return WeightSources(dict([_checkpoint(cand)]), spec=str(folder))
    if (folder / RUN_FILE).is_file():
        raise ValueError(f"{folder} is a training run without an export yet ({EXPORT_DIR}/ is written when the run "
                         "ends; re-run its `maisi train` command to finish it)")
    found: dict[str, Source] = {}
    unfinished = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        cand = next((c for c in (sub, sub / EXPORT_DIR) if _is_checkpoint(c)), None)
        if cand is not None:
            _add(found, *_checkpoint(cand), f"in {folder}")
        elif (sub / RUN_FILE).is_file():
            unfinished.append(sub.name)
    if unfinished:  # loading the rest would silently drop a network (say, an unfinished ControlNet run)
        raise ValueError(f"{folder} holds training runs without an export yet: {', '.join(unfinished)}; re-run "
                         "their `maisi train` commands to finish them, or give the exported folders one by one")
    if not found:
        raise ValueError(f"{folder} holds no maisi checkpoint (give {ACCEPTED})")
    defaults = json.loads((folder / DEFAULTS_FILE).read_text()) if (folder / DEFAULTS_FILE).is_file() else {}
    return WeightSources(found, defaults, spec=str(folder))


def _is_checkpoint(folder: Path) -> bool:
    # a run folder also holds a config.json (the run's model config), beside its run.json
    return (folder / CONFIG_FILE).is_file() and not (folder / RUN_FILE).is_file()


def _checkpoint(folder: Path) -> tuple[str, Source]:
    saved = read_pretrained_config(folder)
    component, config, _, meta = saved
    own = None if component in MASK_COMPONENTS else config  # the mask model's MaskGenConfig is not shared
    return component, Source(folder, "maisi", own, meta.get("weights_sha256") or "", saved=saved)


def _add(found: dict[str, Source], component: str, src: Source, where: str) -> None:
    if component in found:
        raise ValueError(f"two {component} weights {where}: {found[component].path} and {src.path}; give one")
    found[component] = src


# ---------------------------------------------------------------------------------------------
# Released file names
# ---------------------------------------------------------------------------------------------


def _released_kind(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(component, presets) of a released file name; None for other names."""
    if name in RELEASED_FILES:
        return RELEASED_FILES[name]
    if m := RELEASED_CONTROLNET.fullmatch(name):
        return "controlnet", (m["preset"],) if m["preset"] in SETS else ()
    return None


def _guess_kind(name: str) -> tuple[str, tuple[str, ...]]:
    """(component, presets) of a renamed released file, from words in its name."""
    low = name.lower()
    if low.startswith("mask_generation"):
        raise ValueError(f"{name}: name NVIDIA's mask-generation files as released: mask_generation_autoencoder.pt "
                         "and mask_generation_diffusion_unet.pt")
    if "autoencoder" in low or "vae" in low:
        return "autoencoder", ()
    if "controlnet" in low:
        return "controlnet", ()
    if "unet" in low or "diff" in low:
        return "unet", ("ddpm-ct",) if "ddpm" in low else ()
    raise ValueError(f"cannot tell which network {name} holds; name it like the released files "
                     "(autoencoder_*.pt, diff_unet_*.pt, controlnet_*.pt) or give a maisi checkpoint folder")


def _released_preset(found: dict[str, Source], set_name: str | None) -> str | None:
    """The preset of the released files: the set's, else the one their names give (an autoencoder's only
    when no diffusion network names one); files of two different models are an error."""
    if set_name:
        return set_name
    released = {c: s for c, s in found.items() if s.format == "released" and s.presets}
    named = {s.presets[0]: s.path for c, s in released.items() if c != "autoencoder"}
    if len(named) > 1:
        raise ValueError("released files of different models given: "
                         + ", ".join(f"{p.name} ({name})" for name, p in named.items()))
    if named:
        return next(iter(named))
    return released["autoencoder"].presets[0] if "autoencoder" in released else None
