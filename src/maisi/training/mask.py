"""`maisi train mask`: the mask autoencoder on label maps (cross-entropy over the 125 classes + KL), then the mask
diffusion UNet on its latents with each map's size vector as context (REFERENCE §8). Both phases run through
training.loop, so each resumes from its own run folder and runs under torchrun."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn

from maisi.config import MASK_PRESETS, NUM_CLASSES, MaskGenConfig, from_dict, mask_preset, to_dict
from maisi.data.datalist import read_datalist
from maisi.data.datasets import check_volumes
from maisi.data.labelmap import resample_label
from maisi.io.atomic import check_output_dir
from maisi.io.volume import read_volume
from maisi.maskgen.context import CONDITIONS_FILE, CONDITIONS_KEY, DONT_CARE, TUMOR_LABELS
from maisi.maskgen.encoding import encode_label_map, to_class_index
from maisi.maskgen.networks import MaskModel, build_mask_autoencoder, build_mask_unet, load_mask_model
from maisi.maskgen.sizes import conditions_entries, structure_volumes, write_conditions
from maisi.networks.weights import resolve
from maisi.training import distributed as D
from maisi.training.controlnet import tumour_roi
from maisi.training.diffusion import DiffusionStage
from maisi.training.loop import (
    EXPORT_DIR,
    LoopOptions,
    SampleDataset,
    autocast,
    check_run_dir,
    training_loop,
    write_run_dir,
)
from maisi.training.losses import kl_loss, weighted_mse
from maisi.training.options import TrainOptions
from maisi.training.run import TrainResult
from maisi.training.state import load_latest_checkpoint, sample_generator
from maisi.training.vae import SampledVAE

PHASES = ("mask_autoencoder", "mask_unet")  # the run folder's two sub-runs, in order (also the components)
UNET_OPTIONS = ("unet_steps", "unet_lr", "unet_batch_size", "context_dropout", "tumor_weight", "lr_power",
                "ema_decay", "scale_factor")  # the fields only the UNet phase depends on


@dataclass(frozen=True)
class MaskStageOptions:
    lr: float = 1e-4  # autoencoder
    kl_weight: float = 1e-6
    dice_weight: float = 0.0  # autoencoder: + dice_weight · soft Dice over the classes (small structures count)
    class_balance: float = 0.0  # autoencoder: cross-entropy weight of a class ∝ (its voxel share)^-class_balance
    unet_lr: float = 1e-4
    context_dropout: float = 0.0  # UNet: P(a sample's context becomes all "don't care"), for guidance
    tumor_weight: float = 1.0  # UNet: MSE weight of latent voxels over a tumour (1: plain, as the reference)
    lr_power: float = 2.0  # polynomial decay of the UNet's learning rate to 0 at its last step
    ema_decay: float = 0.999  # EMA of the UNet's weights, exported; 0: none
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for k in ("lr", "unet_lr"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        for k in ("kl_weight", "dice_weight", "class_balance", "lr_power"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.tumor_weight < 1:
            raise ValueError(f"tumor_weight must be >= 1, got {self.tumor_weight}")
        if not 0 <= self.context_dropout < 1:
            raise ValueError(f"context_dropout must be in [0, 1), got {self.context_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True, kw_only=True)
class MaskTrainOptions(TrainOptions):
    """Both mask networks on label maps (a datalist with "label" entries: `maisi phantom` writes one). `steps` are
    the autoencoder's, `unet_steps` the UNet's; `config` is a mask preset (mask-tiny, mask-ct) or a JSON file
    ({"preset": name, ...overrides} or a whole MaskGenConfig); `init` a mask model to start from: its autoencoder,
    which must have the config's architecture, and its UNet when that has the config's architecture too (a UNet of
    another architecture starts fresh, and the log says so)."""

    stage: ClassVar[str] = "mask"
    component: ClassVar[str] = "mask_autoencoder"
    resumable: ClassVar[tuple[str, ...]] = (*TrainOptions.resumable, "unet_steps")

    unet_steps: int = 1000
    unet_lr: float = 1e-4
    unet_batch_size: int | None = None  # the UNet's batch; None: batch_size (a 16³ latent batch is cheap)
    kl_weight: float = 1e-6
    dice_weight: float = 0.0
    class_balance: float = 0.0
    context_dropout: float = 0.0  # P(the UNet sees the all-"don't care" context), so that guidance can use it
    tumor_weight: float = 1.0  # UNet MSE weight over the tumours' latent voxels
    lr_power: float = 2.0
    ema_decay: float = 0.999
    scale_factor: float | None = None  # latent scale; None: the init model's, else 1/std of the latents

    def __post_init__(self) -> None:
        if self.unet_steps < 1:
            raise ValueError(f"unet_steps must be >= 1, got {self.unet_steps}")
        if self.unet_batch_size is not None and self.unet_batch_size < 1:
            raise ValueError(f"unet_batch_size must be >= 1, got {self.unet_batch_size}")
        if self.scale_factor is not None and self.scale_factor <= 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor}")
        super().__post_init__()

    def loop_options(self, phase: str = PHASES[0]) -> LoopOptions:
        """The loop of one phase: its own run folder (<out>/mask_autoencoder, <out>/mask_unet) and length."""
        unet = phase != PHASES[0]
        return replace(super().loop_options(), run_dir=Path(self.out) / phase,
                       steps=self.unet_steps if unet else self.steps,
                       batch_size=(self.unet_batch_size or self.batch_size) if unet else self.batch_size)

    def stage_options(self, precision: str) -> MaskStageOptions:
        return MaskStageOptions(lr=self.lr, kl_weight=self.kl_weight, dice_weight=self.dice_weight,
                                class_balance=self.class_balance, context_dropout=self.context_dropout,
                                tumor_weight=self.tumor_weight,
                                unet_lr=self.unet_lr, lr_power=self.lr_power, ema_decay=self.ema_decay,
                                precision=precision)


def mask_config(source: str | Path | None) -> MaskGenConfig:
    """A mask preset name, or a JSON file: a whole MaskGenConfig or {"preset": name, ...top-level overrides}."""
    if source is None or str(source) in MASK_PRESETS:
        return mask_preset(str(source or "mask-tiny"))
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"unknown mask preset or missing config file {str(source)!r}; presets: {sorted(MASK_PRESETS)}")
    data = json.loads(path.read_text())
    if "preset" in data:
        data = {**to_dict(mask_preset(data.pop("preset"))), **data}
    return from_dict(MaskGenConfig, data)


# ---------------------------------------------------------------------------------------------
# Data: label maps on the mask model's grid, then their latents and size vectors
# ---------------------------------------------------------------------------------------------


class LabelMaps:
    """The label maps, resampled (nearest, centred pad/crop) once onto the mask model's output grid and checked
    against its vocabulary; `class_counts` are the voxels of each class over all maps."""

    def __init__(self, files: Sequence[str | Path], config: MaskGenConfig):
        self.files = [Path(f) for f in files]
        self.spacing = (config.spacing_mm,) * 3
        self.labels = []
        self.class_counts = torch.zeros(NUM_CLASSES, dtype=torch.float64)
        for f in self.files:
            vol = read_volume(f)
            label, _ = resample_label(np.rint(vol.array).astype(np.uint8), vol.affine, config.output_shape,
                                      self.spacing)
            try:
                index = to_class_index(label)
            except ValueError as e:
                raise ValueError(f"{f}: {e}") from None
            self.class_counts += torch.bincount(index.ravel(), minlength=NUM_CLASSES).double()
            self.labels.append(label)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int, g: torch.Generator, sample: int = 0) -> dict[str, Tensor]:
        return {"label": torch.from_numpy(self.labels[i].astype(np.int64))[None]}

    def class_weights(self, power: float) -> Tensor:
        """Cross-entropy weight of each of the classes: (its share of the maps' voxels)^-power; 1 for a class
        the maps lack (it is never a target) and for every class when power is 0."""
        counts = self.class_counts
        share = counts / counts.sum()
        return torch.where(counts > 0, share.clamp_min(1e-12) ** -power, 1.0).float()

    def conditions(self) -> list[dict[str, Any]]:
        """The conditions entries of the maps (sizes: percentiles of their volumes on this grid)."""
        volumes = np.stack([structure_volumes(lab, self.spacing) for lab in self.labels])
        return conditions_entries(volumes, [f.name for f in self.files])


class MaskLatents:
    """Each map's latent (the trained autoencoder's mean), its size vector, and the latent voxels over a tumour of
    the size slots (1×latent grid, 0/1)."""

    def __init__(self, latents: Tensor, contexts: Tensor, tumors: Tensor):
        self.latents, self.contexts, self.tumors = latents, contexts, tumors

    def __len__(self) -> int:
        return len(self.latents)

    def load(self, i: int, g: torch.Generator, sample: int = 0) -> dict[str, Tensor]:
        return {"latent": self.latents[i], "context": self.contexts[i], "tumor": self.tumors[i]}


def tumour_latent_voxels(maps: LabelMaps, factor: int) -> Tensor:
    """K×1×latent grid: 1 where the latent voxel's factor³ block holds a voxel of a size slot's tumour."""
    ids = tuple(TUMOR_LABELS.values())
    return torch.cat([tumour_roi(torch.from_numpy(lab.astype(np.int64))[None, None], ids, factor)
                      for lab in maps.labels])


@torch.no_grad()
def encode_maps(autoencoder: nn.Module, maps: LabelMaps, device: torch.device) -> Tensor:
    """K×C×latent means of the maps, one at a time, on the CPU."""
    autoencoder.eval()
    out = []
    for i in range(len(maps)):
        x = encode_label_map(maps.load(i, torch.Generator())["label"][None]).to(device)
        out.append(autoencoder.encode(x)[0][0].float().cpu())
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# The two stages
# ---------------------------------------------------------------------------------------------


def present_dice(logits: Tensor, target: Tensor) -> Tensor:
    """MONAI's soft Dice loss (whole batch) of N×C×... logits against N×... class indices, over the classes the
    batch holds: each of the other ~100 of the 125 would add a loss near 1 that only pushes its probability to 0,
    and drown the small structures the term is for."""
    present = torch.unique(target)
    probs = logits.softmax(1)[:, present]
    onehot = (target[:, None] == present.view(1, -1, *([1] * (target.ndim - 1)))).to(probs.dtype)
    return DiceLoss(batch=True)(probs, onehot)


class MaskAutoencoderStage:
    """Bit planes in, 125 class logits out: cross-entropy against the class indices + kl_weight · KL, and with
    dice_weight > 0 + dice_weight · soft Dice (MONAI's DiceLoss over the classes the batch holds): cross-entropy alone
    is ruled by the big classes and lets a tumour of a few voxels vanish from the reconstruction. `class_weights`
    (LabelMaps.class_weights) weight the cross-entropy per target class (a weighted mean over the voxels)."""

    name = component = "mask_autoencoder"

    @staticmethod
    def resume_scope(config: MaskGenConfig) -> dict[str, Any]:
        """The part of the config a run folder's autoencoder phase must keep to resume (the UNet may change)."""
        return autoencoder_part(config)

    @staticmethod
    def resume_advice(options: MaskTrainOptions, run_dir: Path) -> str:
        return "its autoencoder or grid differs; resume with the same ones or use another out folder"

    @staticmethod
    def resume_fixed(options: MaskTrainOptions) -> tuple[str, ...]:
        """The options the autoencoder phase must keep to resume (the UNet's may change)."""
        return tuple(k for k in options.fixed() if k not in UNET_OPTIONS)

    def __init__(self, autoencoder: nn.Module, config: MaskGenConfig, opts: MaskStageOptions, world: D.World,
                 seed: int = 0, class_weights: Tensor | None = None):
        self.config, self.opts, self.world, self.seed = config, opts, world, seed
        self.class_weights = None if class_weights is None else class_weights.to(world.device)
        self.autoencoder = autoencoder.to(world.device)
        self.model = D.wrap(SampledVAE(self.autoencoder), world)
        self.opt = torch.optim.Adam(self.autoencoder.parameters(), lr=opts.lr)


    def modules(self) -> dict[str, nn.Module]:
        return {"mask_autoencoder": self.autoencoder}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"mask_autoencoder": self.opt}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def export(self) -> tuple[nn.Module, dict[str, Any]]:
        return self.autoencoder, {}

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        labels = batch["label"]
        x, target = encode_label_map(labels).to(self.world.device), to_class_index(labels)[:, 0]
        f = self.config.autoencoder.downsample_factor
        shape = (self.config.autoencoder.latent_channels, *(n // f for n in labels.shape[2:]))
        eps = torch.stack([torch.randn(shape, generator=sample_generator(self.seed, int(s), 2))
                           for s in batch["sample"]]).to(x.device)
        self.model.train()
        with autocast(self.world.device, self.opts.precision):
            logits, mu, sigma = self.model(x, eps)
        ce = F.cross_entropy(logits.float(), target.to(logits.device), weight=self.class_weights)
        kl = kl_loss(mu, sigma)
        loss = ce + self.opts.kl_weight * kl
        dice = present_dice(logits.float(), target) if self.opts.dice_weight else None
        if dice is not None:
            loss = loss + self.opts.dice_weight * dice
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        accuracy = (logits.argmax(1) == target).float().mean()
        out = {"loss": loss.item(), "loss_ce": ce.item(), "loss_kl": kl.item(), "accuracy": accuracy.item()}
        return out | ({"loss_dice": dice.item()} if dice is not None else {})


def drop_context(context: Tensor, samples: Tensor, p: float, seed: int) -> Tensor:
    """Each sample's size vector replaced by all "don't care" (−1) with probability p, drawn per sample: the
    unconditional branch that classifier-free guidance (MaskGenConfig.guidance_scale) subtracts."""
    if p <= 0:
        return context
    drop = torch.tensor([bool(torch.rand(1, generator=sample_generator(seed, s, 8)) < p) for s in samples.tolist()])
    return torch.where(drop.to(context.device).view(-1, *([1] * (context.ndim - 1))),
                       torch.full_like(context, DONT_CARE), context)


class MaskDiffusionStage(DiffusionStage):
    """The mask UNet on scaled latents (training.diffusion's stage): the config scheduler's target (ε for the
    released DDPM, the velocity for rectified flow), MSE weighted over tumours, the size context (dropped at random
    for guidance)."""

    name = component = "mask_unet"
    resume_scope = staticmethod(to_dict)  # the whole config: the UNet trains on this autoencoder's latents

    @staticmethod
    def resume_advice(options: MaskTrainOptions, run_dir: Path) -> str:
        return (f"to train a new UNet on this run's autoencoder, remove {run_dir}, or start another out folder with "
                f"init {options.out}")

    @staticmethod
    def resume_fixed(options: MaskTrainOptions) -> tuple[str, ...]:
        return options.fixed()  # all of them: the UNet trains on the autoencoder's latents

    @property
    def base_lr(self) -> float:
        return self.opts.unet_lr

    def conditions(self, batch: dict[str, Any]) -> dict[str, Any]:
        context = drop_context(batch["context"].float(), batch["sample"], self.opts.context_dropout, self.seed)
        return {"context": context.view(len(context), 1, -1)}

    def loss(self, pred: Tensor, target: Tensor, batch: dict[str, Any]) -> Tensor:
        """MSE, with `tumor_weight` on the latent voxels over a tumour (a tumour is a few of the 4096 latent voxels).
        The weight depends on the target, so it also pulls the prediction toward drawing tumour: with 10 the slot
        counted, but the tumours came out 3-4x too large (docs/mask-generation.md)."""
        return weighted_mse(pred, target, batch["tumor"].to(pred.device), self.opts.tumor_weight)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run_mask_training(options: MaskTrainOptions, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train the autoencoder to `steps`, then the UNet to `unet_steps`, each resuming from its sub-run's last
    checkpoint; `<out>/mask_unet/export/` also holds the conditions file of the training maps, so `maisi generate
    --weights <model folder> <out>` finds everything."""
    if options.threads:
        torch.set_num_threads(options.threads)
    check_output_dir(options.out, "run folder")
    entries = read_datalist(options.data)
    missing = [i for i, e in enumerate(entries) if not e.get("label")]
    if missing:
        raise ValueError(f"{options.data}: the mask model trains on label maps; entries {missing[:10]} have no \"label\"")
    check_volumes(entries, ("label",))
    config = mask_config(options.config)
    maps = LabelMaps([e["label"] for e in entries], config)  # unknown ids fail here, before any weights
    phases = (MaskAutoencoderStage, MaskDiffusionStage)
    previous = {stage.name: _check_phase(stage, options, config) for stage in phases}  # both, before any work
    init = _init(options, config, log)
    world = D.init(options.device)
    try:
        states = {phase: load_latest_checkpoint(options.loop_options(phase).run_dir, map_location=world.device)
                  for phase in PHASES}  # a sub-run whose checkpoints are all damaged is refused here
        precision = options.precision if options.precision != "auto" else (
            "bf16" if world.device.type == "cuda" else "fp32")
        opts = options.stage_options(precision)
        torch.manual_seed(options.seed)  # the same fresh weights on every rank and every run
        ae = init.autoencoder if init else build_mask_autoencoder(config)
        weights = maps.class_weights(options.class_balance) if options.class_balance else None
        ae_stage = MaskAutoencoderStage(ae, config, opts, world, options.seed, weights)
        _loop(ae_stage, maps, options, world, log, previous, states)

        conditions = maps.conditions()
        latents = encode_maps(ae_stage.autoencoder, maps, world.device)
        contexts = torch.tensor([e[CONDITIONS_KEY] for e in conditions], dtype=torch.float32)
        init_unet = init.unet if init and to_dict(init.config.unet) == to_dict(config.unet) else None
        scale = options.scale_factor or (init.scale_factor if init_unet else 1.0 / float(latents.double().std()))
        torch.manual_seed(options.seed)
        unet = init_unet or build_mask_unet(config)
        unet_stage = MaskDiffusionStage(unet, config, opts, world, options.unet_steps, scale, options.seed)
        tumors = tumour_latent_voxels(maps, config.autoencoder.downsample_factor)
        metrics = _loop(unet_stage, MaskLatents(latents, contexts, tumors), options, world, log, previous, states)
        if world.is_main:
            write_conditions(options.loop_options(PHASES[1]).run_dir / EXPORT_DIR / CONDITIONS_FILE, conditions)
        D.barrier(world)
        return TrainResult(Path(options.out), options.unet_steps, metrics)
    finally:
        D.shutdown()


def _init(options: MaskTrainOptions, config: MaskGenConfig, log: Callable[[str], None] | None) -> MaskModel | None:
    """The mask model `init` names, whose autoencoder must have `config`'s architecture (and so its grid)."""
    if not options.init:
        return None
    model = load_mask_model(resolve(options.init), preset=config.name if config.name in MASK_PRESETS else None)
    if model is None:
        raise ValueError(f"{options.init}: no mask model there (mask_autoencoder/ + mask_unet/, or NVIDIA's files)")
    if to_dict(model.config.autoencoder) != to_dict(config.autoencoder) or model.config.latent_shape != config.latent_shape:
        raise ValueError(f"{options.init}: its mask autoencoder does not have the architecture and grid of config "
                         f"{config.name!r}")
    if to_dict(model.config.unet) != to_dict(config.unet) and log:
        log(f"{options.init}: its mask UNet has another architecture than config {config.name!r}; "
            "the autoencoder starts from it, the UNet starts fresh")
    return model


def autoencoder_part(config: MaskGenConfig) -> dict[str, Any]:
    """What the mask autoencoder's training depends on: its architecture and the grid of the maps. A run folder's
    autoencoder phase resumes under a config that changes the UNet only."""
    return {"autoencoder": to_dict(config.autoencoder), "latent_shape": list(config.latent_shape),
            "spacing_mm": config.spacing_mm}


def _check_phase(stage: type[MaskAutoencoderStage | MaskDiffusionStage], options: MaskTrainOptions,
                 config: MaskGenConfig) -> dict[str, Any] | None:
    """The record of one phase's sub-run (None if new), refused before any work where it cannot resume."""
    run_dir = options.loop_options(stage.name).run_dir
    return check_run_dir(run_dir, stage.name, config, options.record(), stage.resume_fixed(options),
                         stage.resume_scope, stage.resume_advice(options, run_dir))


def _loop(stage: MaskAutoencoderStage | MaskDiffusionStage, source: Any, options: MaskTrainOptions, world: D.World,
          log: Callable[[str], None] | None, previous: dict[str, dict[str, Any] | None],
          states: dict[str, dict[str, Any] | None]) -> dict[str, float]:
    """One phase: its run.json (`previous`: the records check_run_dir read) and its loop, resumed from `states`."""
    loop = options.loop_options(stage.name)
    state = states[stage.name]
    if world.is_main:
        write_run_dir(loop.run_dir, stage.name, stage.config, options.record(), previous[stage.name],
                      step=int(state["step"]) if state else 0)
    D.barrier(world)
    return training_loop(stage, SampleDataset(source, options.seed), loop, world, state=state, log=log)
