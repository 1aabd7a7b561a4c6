"""`maisi train vae|diffusion|controlnet`: train or fine-tune one stage; re-running the command resumes."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maisi.training.options import StageOptions

INVERTED = {"progress": "--no-progress", "tensorboard": "--no-tensorboard"}  # fields set by a flag's absence
# How the library names the run folder -> the flag (maisi.cli.main puts every error through these)
PHRASES = {"run folder (out)": "run folder (--out)"}


CONFIG_HELP = ("preset name or JSON config (default: the --init/--unet maisi checkpoint's, else the preset of their "
               "released files, else 'tiny')")
MASK_CONFIG_HELP = "mask preset (mask-tiny, mask-ct) or JSON config (default mask-tiny; an --init must match it)"


def _common(p: argparse.ArgumentParser, lr: float, batch: int, config_help: str = CONFIG_HELP) -> None:
    p.add_argument("--config", help=config_help)
    p.add_argument("--data", required=True, help="datalist JSON ({'training': [...]} or a list)")
    p.add_argument("--out", required=True, type=Path, help="run folder (re-run the same command to resume)")
    p.add_argument("--steps", type=int, default=1000, help="total optimisation steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=batch, help=f"global batch over all processes (default {batch})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr:g})")
    p.add_argument("--init", help="start from weights: a released set (rflow-ct, ...), a maisi checkpoint, model or "
                                  "training run folder, or a released .pt file")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between training checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: torch's choice)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes per training process")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard log even if it is installed")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the VAE-GAN, the diffusion UNet or the ControlNet (resumable, torchrun)")
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True)

    v = stages.add_parser("vae", help="VAE-GAN on image patches (L1 + KL + perceptual + adversarial)")
    _common(v, 1e-4, 1)
    v.add_argument("--patch", type=int, nargs="+", default=[64],
                   help="patch edge(s) in voxels; several give a curriculum with --patch-switch (e.g. 64 128)")
    v.add_argument("--patch-switch", type=int, nargs="*", default=[], help="steps at which the next --patch starts")
    v.add_argument("--intensity", choices=["ct", "percentile"], default="ct",
                   help="ct: HU [-1000, 1000] -> [0, 1]; percentile: p0.5..p99.5 -> [0, 1] (MR)")
    v.add_argument("--augment", default="none",
                   help="patch augmentation preset: none (default), flip (random flips per axis), standard (flips, "
                        "small rotation and scaling, intensity scale and shift); drawn per sample, so resuming is exact")
    v.add_argument("--kl-weight", type=float, default=1e-7)
    v.add_argument("--perceptual-weight", type=float, default=0.3)
    v.add_argument("--perceptual-fraction", type=float, default=0.2, help="share of slices per axis (default 0.2)")
    v.add_argument("--perceptual-weights", help="state dict for the perceptual backbone (default: bundled ImageNet)")
    v.add_argument("--adv-weight", type=float, default=0.1)
    v.add_argument("--adv-start", type=int, default=0, help="warm-up steps without the adversarial terms")
    v.add_argument("--disc-lr", type=float, help="discriminator learning rate (default: --lr)")
    v.add_argument("--disc-layers", type=int, default=3)
    v.add_argument("--disc-channels", type=int, default=32)
    v.add_argument("--recon-loss", choices=["l1", "mse"], default="l1")
    v.add_argument("--bright-weight", type=float, default=0.0,
                   help="extra reconstruction weight on voxels above --bright-above (e.g. 4: thin bone counts 5x)")
    v.add_argument("--bright-above", type=float, default=0.6,
                   help="threshold in the [0, 1] training intensity (default 0.6: 200 HU with --intensity ct)")
    v.add_argument("--freeze-encoder", action="store_true",
                   help="train the decoder only, so the latents and the UNet/ControlNet trained on them stay valid")
    v.add_argument("--lr-power", type=float, default=0.0,
                   help="polynomial learning-rate decay to 0 at --steps (default 0: constant, as the reference)")

    d = stages.add_parser("diffusion", help="latent diffusion UNet on cached latents (`maisi prepare`)")
    _common(d, 1e-4, 1)
    _latent_args(d)
    d.add_argument("--loss", choices=["l1", "mse"], default="l1")
    d.add_argument("--modality-dropout", type=float, default=0.1, help="unconditional share for guidance")
    d.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights, exported (0: none)")
    d.add_argument("--lr-power", type=float, default=2.0, help="polynomial learning-rate decay power")

    c = stages.add_parser("controlnet", help="ControlNet on latents + label masks, with a frozen UNet")
    _common(c, 1e-5, 1)
    _latent_args(c)
    c.add_argument("--unet", required=True, help="the frozen UNet: a released set, a maisi checkpoint, model or "
                                                 "training run folder, or a released .pt file")
    c.add_argument("--tumor-labels", nargs="+", default=None,
                   help="label names or ids weighted in the loss (default: every tumour with a host organ)")
    c.add_argument("--tumor-weight", type=float, default=100.0)
    c.add_argument("--contrastive-weight", type=float, default=0.0, help="region-contrastive loss (MAISI-v2: 0.01)")
    c.add_argument("--contrastive-delta", type=float, default=2.0)

    m = stages.add_parser("mask", help="the mask generation model on label maps: its autoencoder (--steps), then its "
                                       "diffusion UNet with the size vectors as context (--unet-steps)")
    _common(m, 1e-4, 1, MASK_CONFIG_HELP)
    m.add_argument("--unet-steps", type=int, default=1000, help="UNet optimisation steps (default 1000)")
    m.add_argument("--unet-lr", type=float, default=1e-4, help="UNet learning rate (default 1e-4)")
    m.add_argument("--kl-weight", type=float, default=1e-6, help="autoencoder KL weight (default 1e-6)")
    m.add_argument("--dice-weight", type=float, default=0.0,
                   help="autoencoder soft-Dice weight beside the cross-entropy (default 0; small tumours need it)")
    m.add_argument("--class-balance", type=float, default=0.0,
                   help="weight each class's cross-entropy by (its voxel share)^-P (default 0: plain; 0.5: inverse "
                        "square root, so rare classes such as tumours count)")
    m.add_argument("--unet-batch-size", type=int,
                   help="maps per UNet step (default: --batch-size; a batch of 4 latents of 16³ costs about 1.2x one)")
    m.add_argument("--context-dropout", type=float, default=0.0,
                   help="probability that the UNet sees the all-\"don't care\" context, so that generation can use "
                        "classifier-free guidance on the sizes (default 0; 0.1-0.2 typical)")
    m.add_argument("--tumor-weight", type=float, default=1.0,
                   help="UNet loss weight on the latent voxels over a tumour (default 1: plain MSE; a tumour is a few "
                        "latent voxels; a weight above 1 makes its size slot count but draws larger tumours)")
    m.add_argument("--lr-power", type=float, default=2.0, help="polynomial decay power of the UNet learning rate")
    m.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the UNet weights, exported (0: none)")
    m.add_argument("--scale-factor", type=float, help="latent scale (default: --init's, else 1/std of the latents)")
    p.set_defaults(run=run)
    m.set_defaults(run=run_mask)


def _latent_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latent", choices=["mean", "sample"], default="mean",
                   help="train on mu, or on mu + sigma*eps drawn per sample (the reference's cache)")
    p.add_argument("--scale-factor", type=float,
                   help="latent scale (default: the --init/--unet checkpoint's, else 1/std of the latents)")


def options_from_args(args: argparse.Namespace, cls: type | None = None) -> StageOptions:
    """The stage's training options (`cls`, else the stage's) from the parsed flags (each flag's dest is the
    field's name)."""
    from maisi.training.options import STAGES

    cls = cls or STAGES[args.stage]
    names = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names}
    return cls(**values, progress=not args.no_progress, tensorboard=not args.no_tensorboard)


def flags_of(cls: type) -> dict[str, str]:
    """Field name → the flag that sets it, for every field of a stage's options."""
    return {f.name: "--" + f.name.replace("_", "-") for f in fields(cls)} | INVERTED


def flagged(message: str, flags: dict[str, str]) -> str:
    """A library message put in the user's words: the field that leads it, any field listed with its values
    ("seed (recorded 0, given 1)") and any snake_case field named in it become their flags ("lr_power must be
    >= 0" → "--lr-power must be >= 0")."""
    head = re.match(r"[a-z]\w*", message)
    if head and head.group() in flags:
        message = flags[head.group()] + message[head.end():]
    # a field listed with its values ("seed (recorded 0, given 1)", a refused resume)
    listed = "|".join(sorted((f for f in flags if "_" not in f), key=len, reverse=True))
    message = re.sub(rf"(?<![\w/.-])({listed})(?= \(recorded )", lambda m: flags[m.group()], message)
    snake = "|".join(sorted((f for f in flags if "_" in f), key=len, reverse=True))
    return re.sub(rf"\b({snake})\b", lambda m: flags[m.group()], message) if snake else message


@contextlib.contextmanager
def one_line_warnings(flags: dict[str, str]) -> Iterator[None]:
    """The training library's warnings (a damaged checkpoint skipped) as `maisi train: warning: …` lines, in
    flags, without Python's source line."""
    from maisi.training.state import CheckpointWarning

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, CheckpointWarning):
            print(f"maisi train: warning: {flagged(str(message), flags)}", file=sys.stderr)
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckpointWarning)
        shown, warnings.showwarning = warnings.showwarning, show
        yield


def run(args: argparse.Namespace) -> int:
    from maisi.training.options import STAGES
    from maisi.training.run import run_stage

    flags = flags_of(STAGES[args.stage])
    try:
        with one_line_warnings(flags):
            run_stage(options_from_args(args), log=print)
    except ValueError as e:
        raise ValueError(flagged(str(e), flags)) from e
    return 0


def run_mask(args: argparse.Namespace) -> int:
    from maisi.training.mask import MaskTrainOptions, run_mask_training

    flags = flags_of(MaskTrainOptions)
    try:
        with one_line_warnings(flags):
            run_mask_training(options_from_args(args, MaskTrainOptions), log=print)
    except ValueError as e:
        raise ValueError(flagged(str(e), flags)) from e
    return 0
