"""What one training run takes: a frozen options dataclass per stage, checked when it is made."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from maisi.data.augment import AUGMENTS
from maisi.data.datasets import INTENSITIES, LATENT_USES
from maisi.labels import TUMOR_HOSTS, label_id
from maisi.training.controlnet import ControlNetOptions
from maisi.training.diffusion import DiffusionOptions
from maisi.training.discriminator import Discriminator
from maisi.training.loop import LoopOptions
from maisi.training.vae import VAEOptions

PRECISIONS = ("auto", "fp32", "bf16")
SEED_RANGE = (0, 2**63 - 1)  # mix_seed and torch.manual_seed take 64-bit seeds
PATH_FIELDS = ("data", "init", "unet", "perceptual_weights")  # recorded by where they lead (run.json)


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """The fields every stage shares. Re-running with the same options and `out` resumes the run."""

    stage: ClassVar[str] = ""
    component: ClassVar[str] = ""  # the network the stage trains and exports
    # What a resumed run may change: its length, checkpoints, reporting, resources (run.json records each
    # invocation). Every other field (config aside: checked as the resolved config) changes what the run computes.
    resumable: ClassVar[tuple[str, ...]] = ("config", "out", "steps", "checkpoint_every", "keep_checkpoints",
                                            "log_every", "device", "threads", "workers", "progress", "tensorboard")

    data: str | Path  # datalist JSON ({"training": [...]} or a list)
    out: str | Path  # run folder
    config: str | None = None  # preset name or JSON; None: the init/unet checkpoint's, else "tiny"
    steps: int = 1000  # total optimisation steps (a resumed run continues up to it)
    batch_size: int = 1  # global batch over all processes
    lr: float = 1e-4
    init: str | None = None  # start from these weights (released set, checkpoint, model or run folder, .pt)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str | None = None  # "cpu", "cuda"; None: cuda when available
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    threads: int | None = None  # CPU threads per process; None: torch's choice
    workers: int = 0  # data-loading worker processes per training process
    progress: bool = True
    tensorboard: bool = True  # a TensorBoard log when tensorboard is installed

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in {SEED_RANGE[0]}..{SEED_RANGE[1]} (2**63 - 1), got {self.seed}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        self.loop_options()  # the loop's and the stage's own checks, now rather than after the data is read
        self.stage_options("fp32")

    def loop_options(self) -> LoopOptions:
        """What the training loop takes: run folder, length, batching, reporting, checkpoints."""
        return LoopOptions(
            run_dir=Path(self.out), steps=self.steps, batch_size=self.batch_size, seed=self.seed,
            checkpoint_every=self.checkpoint_every, log_every=self.log_every, keep_checkpoints=self.keep_checkpoints,
            num_workers=self.workers, progress=self.progress, tensorboard=self.tensorboard,
        )

    def stage_options(self, precision: str) -> Any:
        """The stage's loss and optimiser options (VAEOptions, ...) at the resolved precision."""
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """The options as plain JSON data, for the run folder's run.json; a file or folder an option names is
        recorded by its absolute path, so that a resumed run is compared by where its inputs lead."""
        out = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        for k in PATH_FIELDS:
            if out.get(k) and Path(out[k]).exists():
                out[k] = str(Path(out[k]).resolve())
        return {"stage": self.stage, **out}

    def fixed(self) -> tuple[str, ...]:
        """The fields a resumed run must keep (run.json's recorded values): those that change what it computes."""
        return tuple(f.name for f in fields(self) if f.name not in self.resumable)


@dataclass(frozen=True, kw_only=True)
class VAETrainOptions(TrainOptions):
    """VAE-GAN on image patches (L1 + KL + perceptual + adversarial)."""

    stage: ClassVar[str] = "vae"
    component: ClassVar[str] = "autoencoder"

    patch: tuple[int, ...] = (64,)  # patch edge(s) in voxels; several give a curriculum
    patch_switch: tuple[int, ...] = ()  # steps at which the next patch edge starts
    intensity: str = "ct"  # ct: HU [-1000, 1000] -> [0, 1]; percentile: p0.5..p99.5 -> [0, 1] (MR)
    augment: str = "none"  # patch augmentation preset (maisi.data.augment.AUGMENTS): none, flip, standard
    kl_weight: float = 1e-7
    perceptual_weight: float = 0.3
    perceptual_fraction: float = 0.2  # share of slices per axis
    perceptual_weights: str | None = None  # perceptual backbone state dict; None: bundled ImageNet weights
    adv_weight: float = 0.1
    adv_start: int = 0  # warm-up steps without the adversarial terms
    disc_lr: float | None = None  # None: lr
    disc_layers: int = 3
    disc_channels: int = 32
    recon_loss: str = "l1"
    bright_weight: float = 0.0  # extra reconstruction weight where the target is above bright_above (0: none)
    bright_above: float = 0.6  # training intensity in [0, 1]; with intensity "ct", 0.6 is 200 HU (bone)
    freeze_encoder: bool = False  # decoder-only fine-tune: latents, and the UNet/ControlNet trained on them, stay valid
    lr_power: float = 0.0  # polynomial decay to 0 at `steps`; 0: constant (the reference)

    def __post_init__(self) -> None:
        if not self.patch or min(self.patch) < 1:
            raise ValueError(f"patch must be one or more positive edges, got {list(self.patch)}")
        switches = [0, *self.patch_switch]
        if len(self.patch_switch) != len(self.patch) - 1 or any(a >= b for a, b in zip(switches, switches[1:])):
            raise ValueError(f"patch_switch needs {len(self.patch) - 1} increasing step(s) >= 1 for patch "
                             f"{list(self.patch)}, got {list(self.patch_switch)}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be {' or '.join(map(repr, INTENSITIES))}, got {self.intensity!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(map(repr, AUGMENTS))}, got {self.augment!r}")
        super().__post_init__()  # the stage's own checks first: disc_layers >= 1
        least = Discriminator.min_size_of(self.disc_layers)
        if self.adv_weight > 0 and min(self.patch) < least:
            raise ValueError(f"patch {min(self.patch)} is smaller than the {self.disc_layers}-layer discriminator "
                             f"takes ({least} voxels per axis); use a larger patch or fewer disc_layers (or "
                             f"adv_weight 0: no adversarial terms)")

    def curriculum(self) -> list[tuple[int, int]]:
        """(first step, patch edge) pairs."""
        return list(zip([0, *self.patch_switch], self.patch))

    def stage_options(self, precision: str) -> VAEOptions:
        return VAEOptions(
            lr=self.lr, disc_lr=self.lr if self.disc_lr is None else self.disc_lr, lr_power=self.lr_power,
            kl_weight=self.kl_weight, perceptual_weight=self.perceptual_weight, adv_weight=self.adv_weight,
            adv_start=self.adv_start, perceptual_fraction=self.perceptual_fraction, disc_layers=self.disc_layers,
            disc_channels=self.disc_channels, recon_loss=self.recon_loss, bright_weight=self.bright_weight,
            bright_above=self.bright_above, freeze_encoder=self.freeze_encoder, precision=precision,
        )


@dataclass(frozen=True, kw_only=True)
class LatentTrainOptions(TrainOptions):
    """The fields of the stages that train on cached latents (`maisi prepare`)."""

    latent: str = "mean"  # train on mu, or on mu + sigma*eps drawn per sample (the reference's cache)
    scale_factor: float | None = None  # latent scale; None: the init/unet checkpoint's, else 1/std of the latents

    def __post_init__(self) -> None:
        if self.latent not in LATENT_USES:
            raise ValueError(f"latent must be {' or '.join(map(repr, LATENT_USES))}, got {self.latent!r}")
        if self.scale_factor is not None and self.scale_factor <= 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor}")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class DiffusionTrainOptions(LatentTrainOptions):
    """Latent diffusion UNet on cached latents."""

    stage: ClassVar[str] = "diffusion"
    component: ClassVar[str] = "unet"

    loss: str = "l1"
    modality_dropout: float = 0.1  # unconditional share, for guidance
    ema_decay: float = 0.999  # EMA of the weights, exported; 0: none
    lr_power: float = 2.0  # polynomial learning-rate decay power

    def stage_options(self, precision: str) -> DiffusionOptions:
        return DiffusionOptions(lr=self.lr, lr_power=self.lr_power, loss=self.loss,
                                modality_dropout=self.modality_dropout, ema_decay=self.ema_decay, precision=precision)


@dataclass(frozen=True, kw_only=True)
class ControlNetTrainOptions(LatentTrainOptions):
    """ControlNet on latents and label masks, with a frozen UNet."""

    stage: ClassVar[str] = "controlnet"
    component: ClassVar[str] = "controlnet"

    unet: str  # the frozen UNet: a released set, a maisi checkpoint, model or run folder, or a released .pt file
    lr: float = 1e-5
    tumor_labels: tuple[str | int, ...] | None = None  # names or ids weighted in the loss; None: every tumour
    tumor_weight: float = 100.0
    contrastive_weight: float = 0.0  # region-contrastive loss (MAISI-v2: 0.01)
    contrastive_delta: float = 2.0

    def tumor_ids(self) -> tuple[int, ...]:
        return tuple(TUMOR_HOSTS) if not self.tumor_labels else tuple(label_id(n) for n in self.tumor_labels)

    def stage_options(self, precision: str) -> ControlNetOptions:
        return ControlNetOptions(lr=self.lr, tumor_labels=self.tumor_ids(), tumor_weight=self.tumor_weight,
                                 contrastive_weight=self.contrastive_weight,
                                 contrastive_delta=self.contrastive_delta, precision=precision)


StageOptions = VAETrainOptions | DiffusionTrainOptions | ControlNetTrainOptions
STAGES: dict[str, type[TrainOptions]] = {c.stage: c for c in (VAETrainOptions, DiffusionTrainOptions,
                                                                ControlNetTrainOptions)}
