"""From `maisi train` arguments to a running stage: config, init weights, data, options, the loop."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maisi.config import ModelConfig, load_model_config, to_dict
from maisi.training import distributed as D
from maisi.training.data import ImagePatches, LatentCases, SampleDataset, latent_std, read_datalist
from maisi.training.loop import LoopOptions, prepare_run_dir, training_loop

COMPONENT = {"vae": "autoencoder", "diffusion": "unet", "controlnet": "controlnet"}
# The config parts whose weights a checkpoint of each component holds.
PARTS = {"autoencoder": ("autoencoder",), "unet": ("unet",), "controlnet": ("unet", "controlnet")}


def _check_parts(config: ModelConfig, other: ModelConfig, component: str, what: str) -> None:
    for part in PARTS[component]:
        if to_dict(getattr(config, part)) != to_dict(getattr(other, part)):
            raise ValueError(f"the {part} config of --config does not match {what}; leave out --config "
                             "to use the checkpoint's, or give the config the weights were trained with")


def load_weights(source: str, component: str, config: ModelConfig | None) -> tuple[nn.Module, ModelConfig, dict]:
    """A maisi checkpoint folder (its config checked against `config`) or an NVIDIA .pt (needs `config`)."""
    from maisi.io.checkpoint import load_pretrained, load_released, read_pretrained_config

    path = Path(source)
    if path.is_dir():
        found, ck_config, _, _ = read_pretrained_config(path)
        if found != component:
            raise ValueError(f"{path} holds a {found} checkpoint, not a {component}")
        if config is not None:
            _check_parts(config, ck_config, component, f"the checkpoint {path}")
        model, ck_config, extra = load_pretrained(path)
        return model, config or ck_config, extra
    if config is None:
        raise ValueError(f"{path} is a weights file without a config: give --config (the preset it was trained with)")
    model, extra = load_released(path, component, config)
    return model, config, extra


def _config(args: argparse.Namespace) -> ModelConfig | None:
    if args.config:
        return load_model_config(args.config)
    from maisi.io.checkpoint import read_pretrained_config

    for src in (getattr(args, "init", None), getattr(args, "unet", None)):
        if src and Path(src).is_dir():
            return read_pretrained_config(src)[1]
    return None


def _perceptual(args: argparse.Namespace) -> Any:
    if args.perceptual_weight <= 0:
        return None
    from maisi.training.vae import perceptual_loss

    return perceptual_loss(args.perceptual_weights, args.perceptual_fraction)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("run",)}


def run_stage(args: argparse.Namespace) -> dict[str, float]:
    """Train the stage `args.stage` asks for; returns the last logged metrics."""
    from maisi.networks import build

    if args.threads:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    world = D.init(args.device)
    try:
        precision = args.precision if args.precision != "auto" else ("bf16" if world.device.type == "cuda" else "fp32")
        component = COMPONENT[args.stage]
        config = _config(args)
        entries = read_datalist(args.data)
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
            model, config, init_extra = load_weights(args.init, component, config)
        config = config or load_model_config("tiny")

        if args.stage == "vae":
            from maisi.training.vae import VAEOptions, VAEStage

            if len(args.patch_switch) != len(args.patch) - 1 or list(args.patch_switch) != sorted(args.patch_switch):
                raise ValueError(f"--patch-switch needs {len(args.patch) - 1} increasing step(s) for --patch {args.patch}")
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

                unet, _, unet_extra = load_weights(args.unet, "unet", config)
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
