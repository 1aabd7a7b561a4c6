"""From `maisi train` arguments to a running stage: config, init weights, data, options, the loop."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from maisi.config import load_model_config
from maisi.io.atomic import check_output_dir
from maisi.networks.weights import WeightSources, load_component, merge, resolve
from maisi.training import distributed as D
from maisi.training.data import (
    ImagePatches,
    LatentCases,
    SampleDataset,
    check_volumes,
    latent_std,
    read_datalist,
)
from maisi.training.loop import LoopOptions, prepare_run_dir, training_loop

COMPONENT = {"vae": "autoencoder", "diffusion": "unet", "controlnet": "controlnet"}
VOLUMES = {"vae": ("image",), "diffusion": (), "controlnet": ("label",)}  # datalist volumes each stage reads


def _weights(args: argparse.Namespace) -> WeightSources | None:
    """What the run starts from: --init (this stage's network) and, for a ControlNet, the frozen --unet."""
    parts = [resolve(args.unet, component="unet")] if args.stage == "controlnet" else []
    if args.init:
        parts.append(resolve(args.init, component=COMPONENT[args.stage]))
    return merge(*parts) if parts else None


def _perceptual(args: argparse.Namespace) -> Any:
    if args.perceptual_weight <= 0:
        return None
    from maisi.training.vae import perceptual_loss

    return perceptual_loss(args.perceptual_weights, args.perceptual_fraction)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("run",)}


def check_inputs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The run folder and the training data, before anything is loaded or created: --out can be created or
    written (not a file, not under a file) and every volume of the datalist passes check_volume_file.
    Returns the datalist's entries."""
    if args.stage == "vae" and (len(args.patch_switch) != len(args.patch) - 1
                                or list(args.patch_switch) != sorted(args.patch_switch)):
        raise ValueError(f"--patch-switch needs {len(args.patch) - 1} increasing step(s) for --patch {args.patch}")
    check_output_dir(args.out, "run folder (--out)")
    entries = read_datalist(args.data)
    check_volumes(entries, VOLUMES[args.stage])
    return entries


def run_stage(args: argparse.Namespace) -> dict[str, float]:
    """Train the stage `args.stage` asks for; returns the last logged metrics."""
    from maisi.networks import build

    if args.threads:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    entries = check_inputs(args)  # a bad file or --out fails here: no weights loaded, no run folder made
    world = D.init(args.device)
    try:
        precision = args.precision if args.precision != "auto" else ("bf16" if world.device.type == "cuda" else "fp32")
        component = COMPONENT[args.stage]
        weights = _weights(args)  # --config, else the checkpoints' own config, else their preset
        config = weights.config(args.config) if weights else load_model_config(args.config or "tiny")
        opts = LoopOptions(
            run_dir=args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every,
            keep_checkpoints=args.keep_checkpoints, num_workers=args.workers,
            progress=not args.no_progress, tensorboard=not args.no_tensorboard,
        )
        torch.manual_seed(args.seed)  # the same fresh weights on every rank and every run
        init_extra: dict[str, Any] = {}
        model = None
        if args.init:
            init = load_component(weights, component, config)
            model, init_extra = init.model, init.extra

        if args.stage == "vae":
            from maisi.training.vae import VAEOptions, VAEStage

            source = ImagePatches(entries, list(zip([0, *args.patch_switch], args.patch)), args.batch_size,
                                  intensity=args.intensity)
            vopts = VAEOptions(
                lr=args.lr, disc_lr=args.disc_lr or args.lr, lr_power=args.lr_power, kl_weight=args.kl_weight,
                perceptual_weight=args.perceptual_weight, adv_weight=args.adv_weight, adv_start=args.adv_start,
                perceptual_fraction=args.perceptual_fraction, disc_layers=args.disc_layers,
                disc_channels=args.disc_channels, recon_loss=args.recon_loss, precision=precision,
            )
            stage = VAEStage(model or build("autoencoder", config), config, vopts, world, args.seed, _perceptual(args),
                             steps=args.steps)
        else:
            source = LatentCases(entries, config.autoencoder.latent_channels, args.latent,
                                 with_label=args.stage == "controlnet", default_modality=config.default_modality)
            if args.stage == "diffusion":
                from maisi.training.diffusion import DiffusionOptions, DiffusionStage

                scale = args.scale_factor or init_extra.get("scale_factor") or 1.0 / latent_std(source, args.seed)
                dopts = DiffusionOptions(lr=args.lr, lr_power=args.lr_power, loss=args.loss,
                                         modality_dropout=args.modality_dropout, ema_decay=args.ema_decay,
                                         precision=precision)
                stage = DiffusionStage(model or build("unet", config), config, dopts, world, args.steps,
                                       float(scale), args.seed)
            else:
                from maisi.networks.controlnet import ControlNet
                from maisi.training.controlnet import ControlNetOptions, ControlNetStage

                frozen = load_component(weights, "unet", config)
                unet, unet_extra = frozen.model, frozen.extra
                scale = args.scale_factor or unet_extra.get("scale_factor") or init_extra.get("scale_factor")
                if not scale:
                    raise ValueError(f"{args.unet} records no scale_factor; give --scale-factor")
                copts = ControlNetOptions(lr=args.lr, tumor_labels=_labels(args.tumor_labels),
                                          tumor_weight=args.tumor_weight, contrastive_weight=args.contrastive_weight,
                                          contrastive_delta=args.contrastive_delta, precision=precision)
                controlnet = model or ControlNet.from_unet(unet, config.controlnet)
                stage = ControlNetStage(controlnet, unet, config, copts, world, float(scale), args.seed)

        if world.is_main:
            prepare_run_dir(Path(args.out), args.stage, config, _options(args))
        D.barrier(world)
        return training_loop(stage, SampleDataset(source, args.seed), opts, world)
    finally:
        D.shutdown()


def _labels(names: list[str] | None) -> tuple[int, ...]:
    from maisi.labels import TUMOR_HOSTS, label_id

    return tuple(TUMOR_HOSTS) if not names else tuple(label_id(n) for n in names)
