"""From a stage's training options to a finished run: config, init weights, data, the stage, the loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maisi.config import ModelConfig, load_model_config
from maisi.data.augment import AUGMENTS
from maisi.data.datalist import read_datalist
from maisi.data.datasets import ImagePatches, LatentCases, check_patches, check_volumes
from maisi.io.atomic import check_output_dir
from maisi.networks import build
from maisi.networks.controlnet import ControlNet
from maisi.networks.weights import WeightSources, load_component, merge, resolve
from maisi.training import distributed as D
from maisi.training.controlnet import ControlNetStage
from maisi.training.diffusion import DiffusionStage, latent_std
from maisi.training.loop import EXPORT_DIR, SampleDataset, Stage, check_run_dir, training_loop, write_run_dir
from maisi.training.options import (
    ControlNetTrainOptions,
    DiffusionTrainOptions,
    StageOptions,
    VAETrainOptions,
)
from maisi.training.state import load_latest_checkpoint
from maisi.training.vae import VAEStage, perceptual_loss

VOLUMES = {"vae": ("image",), "diffusion": (), "controlnet": ("label",)}  # datalist volumes each stage reads


@dataclass(frozen=True)
class TrainResult:
    """A finished run: its folder, the step it reached and the last logged metrics (empty if none were left
    to log, e.g. a run that was already complete)."""

    run_dir: Path
    step: int
    metrics: dict[str, float]

    @property
    def export_dir(self) -> Path:
        """The slim inference weights and config (`maisi generate --init` and friends read it)."""
        return self.run_dir / EXPORT_DIR


def check_inputs(options: StageOptions) -> list[dict[str, Any]]:
    """The run folder and the training data, before anything is loaded or created: `out` can be created or
    written (not a file, not under a file) and every volume of the datalist passes check_volume_file.
    Returns the datalist's entries."""
    check_output_dir(options.out, "run folder")
    entries = read_datalist(options.data)
    check_volumes(entries, VOLUMES[options.stage])
    return entries


def run_stage(options: StageOptions, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train the stage `options` describe up to `options.steps`, resuming from the run folder's last
    checkpoint; rank 0 writes config.json, run.json, metrics, checkpoints and export/. `log` receives
    one-line notes (where a resumed run starts).

    Everything that can refuse the run does so before any weights load or anything is written: the options,
    `out`, the datalist's files (volumes, latent headers, label maps), the patch sizes, a run folder that holds
    another stage, config or options (`options.fixed()`), and a run folder whose checkpoints are all damaged."""
    if options.threads:
        torch.set_num_threads(options.threads)
    entries = check_inputs(options)  # a bad file or `out` fails here: no weights loaded, no run folder made
    weights = _weights(options)  # where the networks are, not yet loaded
    config = weights.config(options.config) if weights else load_model_config(options.config or "tiny")
    source = _source(options, entries, config)  # the data's own checks, against the config
    loop = options.loop_options()
    record = options.record()
    previous = check_run_dir(loop.run_dir, options.stage, config, record, options.fixed())
    world = D.init(options.device)
    try:
        state = load_latest_checkpoint(loop.run_dir, map_location=world.device)  # all damaged: refused here
        precision = options.precision
        if precision == "auto":
            precision = "bf16" if world.device.type == "cuda" else "fp32"
        torch.manual_seed(options.seed)  # the same fresh weights on every rank and every run
        init_extra: dict[str, Any] = {}
        model = None
        if options.init:
            init = load_component(weights, options.component, config)
            model, init_extra = init.model, init.extra

        if isinstance(options, VAETrainOptions):
            stage = _vae(options, config, model, world, precision)
        elif isinstance(options, DiffusionTrainOptions):
            stage = _diffusion(options, source, config, model, init_extra, world, precision)
        else:
            stage = _controlnet(options, config, model, init_extra, weights, world, precision)

        if world.is_main:
            start = int(state["step"]) if state else 0
            write_run_dir(loop.run_dir, options.stage, config, record, previous, step=start)
        D.barrier(world)
        metrics = training_loop(stage, SampleDataset(source, options.seed), loop, world, state=state, log=log)
        return TrainResult(loop.run_dir, options.steps, metrics)
    finally:
        D.shutdown()


def _source(options: StageOptions, entries: list[dict[str, Any]], config: ModelConfig) -> ImagePatches | LatentCases:
    """The stage's training data (image patches, or latents with their conditions and labels), checked against
    the config: patch edges, latent headers and channels, label maps."""
    if isinstance(options, VAETrainOptions):
        check_patches(entries, options.patch, config.autoencoder.downsample_factor)
        return ImagePatches(entries, options.curriculum(), options.batch_size, intensity=options.intensity,
                            augment=AUGMENTS[options.augment])
    return LatentCases(entries, config.autoencoder.latent_channels, options.latent,
                       with_label=isinstance(options, ControlNetTrainOptions),
                       default_modality=config.default_modality)


def _weights(options: StageOptions) -> WeightSources | None:
    """What the run starts from: `init` (this stage's network) and, for a ControlNet, the frozen `unet`."""
    parts = [resolve(options.unet, component="unet")] if isinstance(options, ControlNetTrainOptions) else []
    if options.init:
        parts.append(resolve(options.init, component=options.component))
    return merge(*parts) if parts else None


def _vae(options: VAETrainOptions, config: ModelConfig, model: nn.Module | None, world: D.World,
         precision: str) -> Stage:
    autoencoder = model or build("autoencoder", config)
    perceptual = None
    if options.perceptual_weight > 0:
        perceptual = perceptual_loss(options.perceptual_weights, options.perceptual_fraction)
    return VAEStage(autoencoder, config, options.stage_options(precision), world, options.seed, perceptual,
                    steps=options.steps)


def _diffusion(options: DiffusionTrainOptions, source: LatentCases, config: ModelConfig, model: nn.Module | None,
               init_extra: dict[str, Any], world: D.World, precision: str) -> Stage:
    scale = options.scale_factor or init_extra.get("scale_factor") or 1.0 / latent_std(source, options.seed)
    return DiffusionStage(model or build("unet", config), config, options.stage_options(precision), world,
                          options.steps, float(scale), options.seed)


def _controlnet(options: ControlNetTrainOptions, config: ModelConfig, model: nn.Module | None,
                init_extra: dict[str, Any], weights: WeightSources | None, world: D.World, precision: str) -> Stage:
    frozen = load_component(weights, "unet", config)
    scale = options.scale_factor or frozen.extra.get("scale_factor") or init_extra.get("scale_factor")
    if not scale:
        raise ValueError(f"scale_factor is needed: {options.unet} records none")
    controlnet = model or ControlNet.from_unet(frozen.model, config.controlnet)
    return ControlNetStage(controlnet, frozen.model, config, options.stage_options(precision), world, float(scale),
                           options.seed)
