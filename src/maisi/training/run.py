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
from maisi.data.datasets import ImagePatches, LatentCases, check_volumes
from maisi.io.atomic import check_output_dir
from maisi.networks import build
from maisi.networks.controlnet import ControlNet
from maisi.networks.weights import WeightSources, load_component, merge, resolve
from maisi.training import distributed as D
from maisi.training.controlnet import ControlNetStage
from maisi.training.diffusion import DiffusionStage, latent_std
from maisi.training.loop import EXPORT_DIR, SampleDataset, Stage, prepare_run_dir, training_loop
from maisi.training.options import (
    ControlNetTrainOptions,
    DiffusionTrainOptions,
    StageOptions,
    VAETrainOptions,
)
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
    one-line notes (where a resumed run starts)."""
    if options.threads:
        torch.set_num_threads(options.threads)
    entries = check_inputs(options)  # a bad file or `out` fails here: no weights loaded, no run folder made
    world = D.init(options.device)
    try:
        precision = options.precision
        if precision == "auto":
            precision = "bf16" if world.device.type == "cuda" else "fp32"
        weights = _weights(options)  # `config`, else the checkpoints' own config, else their preset
        config = weights.config(options.config) if weights else load_model_config(options.config or "tiny")
        loop = options.loop_options()
        torch.manual_seed(options.seed)  # the same fresh weights on every rank and every run
        init_extra: dict[str, Any] = {}
        model = None
        if options.init:
            init = load_component(weights, options.component, config)
            model, init_extra = init.model, init.extra

        if isinstance(options, VAETrainOptions):
            stage, source = _vae(options, entries, config, model, world, precision)
        elif isinstance(options, DiffusionTrainOptions):
            stage, source = _diffusion(options, entries, config, model, init_extra, world, precision)
        else:
            stage, source = _controlnet(options, entries, config, model, init_extra, weights, world, precision)

        if world.is_main:
            prepare_run_dir(loop.run_dir, options.stage, config, options.record())
        D.barrier(world)
        metrics = training_loop(stage, SampleDataset(source, options.seed), loop, world, log)
        return TrainResult(loop.run_dir, options.steps, metrics)
    finally:
        D.shutdown()


def _weights(options: StageOptions) -> WeightSources | None:
    """What the run starts from: `init` (this stage's network) and, for a ControlNet, the frozen `unet`."""
    parts = [resolve(options.unet, component="unet")] if isinstance(options, ControlNetTrainOptions) else []
    if options.init:
        parts.append(resolve(options.init, component=options.component))
    return merge(*parts) if parts else None


def _vae(options: VAETrainOptions, entries: list[dict[str, Any]], config: ModelConfig, model: nn.Module | None,
         world: D.World, precision: str) -> tuple[Stage, ImagePatches]:
    source = ImagePatches(entries, options.curriculum(), options.batch_size, intensity=options.intensity,
                          augment=AUGMENTS[options.augment])
    autoencoder = model or build("autoencoder", config)
    perceptual = None
    if options.perceptual_weight > 0:
        perceptual = perceptual_loss(options.perceptual_weights, options.perceptual_fraction)
    stage = VAEStage(autoencoder, config, options.stage_options(precision), world, options.seed, perceptual,
                     steps=options.steps)
    return stage, source


def _latents(options: DiffusionTrainOptions | ControlNetTrainOptions, entries: list[dict[str, Any]],
             config: ModelConfig) -> LatentCases:
    return LatentCases(entries, config.autoencoder.latent_channels, options.latent,
                       with_label=isinstance(options, ControlNetTrainOptions),
                       default_modality=config.default_modality)


def _diffusion(options: DiffusionTrainOptions, entries: list[dict[str, Any]], config: ModelConfig,
               model: nn.Module | None, init_extra: dict[str, Any], world: D.World,
               precision: str) -> tuple[Stage, LatentCases]:
    source = _latents(options, entries, config)
    scale = options.scale_factor or init_extra.get("scale_factor") or 1.0 / latent_std(source, options.seed)
    stage = DiffusionStage(model or build("unet", config), config, options.stage_options(precision), world,
                           options.steps, float(scale), options.seed)
    return stage, source


def _controlnet(options: ControlNetTrainOptions, entries: list[dict[str, Any]], config: ModelConfig,
                model: nn.Module | None, init_extra: dict[str, Any], weights: WeightSources | None,
                world: D.World, precision: str) -> tuple[Stage, LatentCases]:
    source = _latents(options, entries, config)
    frozen = load_component(weights, "unet", config)
    scale = options.scale_factor or frozen.extra.get("scale_factor") or init_extra.get("scale_factor")
    if not scale:
        raise ValueError(f"scale_factor is needed: {options.unet} records none")
    controlnet = model or ControlNet.from_unet(frozen.model, config.controlnet)
    stage = ControlNetStage(controlnet, frozen.model, config, options.stage_options(precision), world, float(scale),
                            options.seed)
    return stage, source
