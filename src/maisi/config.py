"""Frozen, JSON-serialisable configs for the networks and schedulers, and the named presets."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_groups(channels: tuple[int, ...], groups: int, where: str) -> None:
    for c in channels:
        _check(
            c % groups == 0,
            f"{where}: every channel count must be divisible by norm_num_groups={groups}, got {c}; "
            f"change the channels or norm_num_groups",
        )


@dataclass(frozen=True)
class AutoencoderConfig:
    """The volume compression network (VAE-GAN generator), REFERENCE §1.1."""

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    latent_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 256)  # one per level; len-1 downsamplings (each ×2)
    num_res_blocks: tuple[int, ...] = (2, 2, 2)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    num_splits: int = 1  # tensor-splitting segments per conv (1 = no splitting)
    split_axis: int = 0  # spatial axis that is split: 0..spatial_dims-1
    # decoder ×2 upsampling: trilinear + 3×3×3 conv (image VAE) or a stride-2 transposed conv (mask VAE, §8)
    upsample_mode: Literal["trilinear", "transposed_conv"] = "trilinear"

    def __post_init__(self) -> None:
        _check(self.spatial_dims in (2, 3), f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        _check(
            self.upsample_mode in ("trilinear", "transposed_conv"),
            f"upsample_mode must be 'trilinear' or 'transposed_conv', got {self.upsample_mode!r}",
        )
        _check(len(self.channels) >= 1, "channels must name at least one level")
        _check(
            len(self.num_res_blocks) == len(self.channels),
            f"num_res_blocks has {len(self.num_res_blocks)} entries but channels has {len(self.channels)}; "
            "give one per level",
        )
        _check_groups(self.channels, self.norm_num_groups, "AutoencoderConfig")
        _check(self.num_splits >= 1, f"num_splits must be >= 1, got {self.num_splits}")
        _check(
            0 <= self.split_axis < self.spatial_dims,
            f"split_axis must be in 0..{self.spatial_dims - 1} (a spatial axis), got {self.split_axis}",
        )
        _check(min(self.in_channels, self.out_channels, self.latent_channels) >= 1, "channel counts must be >= 1")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """The latent diffusion UNet, REFERENCE §1.2 (MONAI DiffusionModelUNetMaisi layout)."""

    spatial_dims: int = 3
    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 256, 512)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    num_head_channels: tuple[int, ...] = (0, 0, 32, 32)
    num_res_blocks: int = 2  # per level on the down path; the up path has one more
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    resblock_updown: bool = True  # v2: resampling inside res blocks; v1: strided conv / nearest + conv
    include_fc: bool = True  # v2: attention output projection
    include_spacing_input: bool = True
    include_region_input: bool = False  # v1: top and bottom body-region one-hots
    num_region_classes: int = 4
    num_class_embeds: int | None = 128  # modality embedding (v2); None: no modality input
    # cross-attention on a context sequence (the mask UNet's 1×10 size vector, §8): attention levels become
    # MONAI SpatialTransformers; None: self-attention only (the image UNets)
    cross_attention_dim: int | None = None
    upcast_attention: bool = False  # attention in fp32 whatever the compute dtype
    # maisi's own option, in no released network: the context (mean over its tokens) also passes through an MLP
    # added to the time embedding, so every res block sees it. A single cross-attention token is only a
    # per-channel constant at the attention levels, which a small UNet learned to ignore (mask-tiny).
    context_embedding: bool = False

    def __post_init__(self) -> None:
        _check(self.spatial_dims in (2, 3), f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        n = len(self.channels)
        _check(
            len(self.attention_levels) == n and len(self.num_head_channels) == n,
            f"attention_levels ({len(self.attention_levels)}) and num_head_channels "
            f"({len(self.num_head_channels)}) must have one entry per level ({n})",
        )
        _check_groups(self.channels, self.norm_num_groups, "UNetConfig")
        for c, att, h in zip(self.channels, self.attention_levels, self.num_head_channels):
            if att:
                _check(
                    h > 0 and c % h == 0,
                    f"UNetConfig: a level with attention needs num_head_channels dividing its {c} channels, got {h}",
                )
        _check(self.num_res_blocks >= 1, "num_res_blocks must be >= 1")
        _check(
            self.num_class_embeds is None or self.num_class_embeds >= 1,
            "num_class_embeds must be None or >= 1",
        )
        _check(
            self.cross_attention_dim is None or self.cross_attention_dim >= 1,
            f"cross_attention_dim must be None or >= 1, got {self.cross_attention_dim}",
        )
        _check(
            not self.context_embedding or self.cross_attention_dim is not None,
            "context_embedding needs a context: set cross_attention_dim",
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class ControlNetConfig:
    """ControlNet conditioning (REFERENCE §1.3); its trunk copies the UNet's encoder half."""

    conditioning_in_channels: int = 8  # bit planes of the integer label map
    conditioning_channels: tuple[int, ...] = (8, 32, 64)

    def __post_init__(self) -> None:
        _check(len(self.conditioning_channels) >= 1, "conditioning_channels must not be empty")
        _check(1 <= self.conditioning_in_channels <= 16, "conditioning_in_channels must be in 1..16 bit planes")


@dataclass(frozen=True)
class SchedulerConfig:
    """Noise schedule and sampler, REFERENCE §2."""

    kind: Literal["ddpm", "ddim", "rflow"] = "rflow"
    num_train_timesteps: int = 1000
    num_inference_steps: int = 30
    beta_start: float = 0.0015  # DDPM/DDIM: scaled-linear betas
    beta_end: float = 0.0195
    use_timestep_transform: bool = True  # rectified flow: resolution-dependent time shift
    base_numel: int = 32**3  # latent voxel count at which the shift is 1
    reference_timesteps: bool = False  # rflow quirk: float16 timesteps and int() truncation

    def __post_init__(self) -> None:
        _check(self.kind in ("ddpm", "ddim", "rflow"), f"kind must be ddpm, ddim or rflow, got {self.kind!r}")
        _check(self.num_train_timesteps >= 1, "num_train_timesteps must be >= 1")
        _check(
            1 <= self.num_inference_steps <= self.num_train_timesteps,
            f"num_inference_steps must be in 1..{self.num_train_timesteps}, got {self.num_inference_steps}",
        )
        _check(0 < self.beta_start < self.beta_end < 1, "need 0 < beta_start < beta_end < 1")
        _check(self.base_numel >= 1, "base_numel must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines one MAISI model: the three networks and the noise schedule."""

    name: str = "rflow-ct"
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    default_modality: int = 1  # modality code (REFERENCE §1.2): 1 = CT
    guidance_scale: float = 0.0

    def __post_init__(self) -> None:
        _check(
            self.autoencoder.latent_channels == self.unet.in_channels == self.unet.out_channels,
            f"the UNet works on the VAE latent: unet in/out channels ({self.unet.in_channels}/"
            f"{self.unet.out_channels}) must equal autoencoder.latent_channels ({self.autoencoder.latent_channels})",
        )
        _check(
            self.autoencoder.spatial_dims == self.unet.spatial_dims,
            "autoencoder and unet must have the same spatial_dims",
        )

    @property
    def image_divisor(self) -> int:
        """Image sizes must be multiples of this (VAE compression × UNet downsampling)."""
        return self.autoencoder.downsample_factor * self.unet.downsample_factor


# ---------------------------------------------------------------------------------------------
# JSON round trip
# ---------------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(item, v, where) for v in value)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(args[0], value, where)
    if origin is Literal:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, bool, str) and not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config from plain data; unknown keys raise ValueError naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{cls.__name__}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_model_config(source: str | Path) -> ModelConfig:
    """A preset name, or a JSON file holding a ModelConfig (or a dict with a "preset" plus overrides)."""
    if str(source) in PRESETS:
        return PRESETS[str(source)]
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"unknown preset or missing config file {str(source)!r}; presets: {sorted(PRESETS)}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict) and "preset" in data:
        base = to_dict(preset(data.pop("preset")))
        data = _merge(base, data)
    return from_dict(ModelConfig, data)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_overrides(config: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """A copy of a config with nested overrides, e.g. {"scheduler": {"num_inference_steps": 10}}."""
    return from_dict(ModelConfig, _merge(to_dict(config), overrides))


# ---------------------------------------------------------------------------------------------
# Named presets (the released architectures and a tiny one for tests and the CPU demo)
# ---------------------------------------------------------------------------------------------

_DDPM_UNET = UNetConfig(
    resblock_updown=False, include_fc=False, include_region_input=True, num_class_embeds=None
)
_DDPM_SCHEDULER = SchedulerConfig(kind="ddpm", num_inference_steps=1000, use_timestep_transform=False)

PRESETS: dict[str, ModelConfig] = {
    "ddpm-ct": ModelConfig(
        name="ddpm-ct",
        autoencoder=AutoencoderConfig(num_splits=8, split_axis=1),
        unet=_DDPM_UNET,
        scheduler=_DDPM_SCHEDULER,
    ),
    "rflow-ct": ModelConfig(name="rflow-ct", autoencoder=AutoencoderConfig(num_splits=4, split_axis=1)),
    "rflow-mr": ModelConfig(
        name="rflow-mr",
        autoencoder=AutoencoderConfig(num_splits=4, split_axis=1),
        default_modality=8,
        guidance_scale=10.0,
    ),
    "rflow-mr-brain": ModelConfig(
        name="rflow-mr-brain",
        autoencoder=AutoencoderConfig(num_splits=4, split_axis=1),
        default_modality=8,
        guidance_scale=2.0,
    ),
    "tiny": ModelConfig(
        name="tiny",
        autoencoder=AutoencoderConfig(channels=(8, 16, 16), num_res_blocks=(1, 1, 1), norm_num_groups=4),
        unet=UNetConfig(
            channels=(16, 16, 32, 32),
            attention_levels=(False, False, True, True),
            num_head_channels=(0, 0, 16, 16),
            num_res_blocks=1,
            norm_num_groups=8,
        ),
        scheduler=SchedulerConfig(kind="rflow", num_inference_steps=30),
    ),
}


def preset(name: str) -> ModelConfig:
    """A named preset; unknown names raise ValueError listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------
# The mask generation model (maisi.maskgen): its config and presets
# ---------------------------------------------------------------------------------------------

NUM_CLASSES = 125  # the mask autoencoder's class logits (label_dict_124_to_132.json: indices 0..124)
BITS = 8  # the label map enters the mask autoencoder as 8 bit planes
CONTEXT_SIZE = 10  # the size vector the UNet cross-attends to (maskgen.context.ANATOMY_SIZE_NAMES)
RELEASED_SCALE_FACTOR = 1.0055984258651733  # config_network_ddpm.json: mask_generation_scale_factor


def _fail(message: str) -> None:
    raise ValueError(message)


@dataclass(frozen=True)
class MaskGenConfig:
    """The mask autoencoder, the mask diffusion UNet, their noise schedule and the output grid."""

    name: str = "mask-ct"
    autoencoder: AutoencoderConfig = field(default_factory=lambda: MASK_AUTOENCODER)
    unet: UNetConfig = field(default_factory=lambda: MASK_UNET)
    scheduler: SchedulerConfig = field(default_factory=lambda: MASK_SCHEDULER)
    latent_shape: tuple[int, ...] = (4, 64, 64, 64)  # C×x×y×z of the sampled latent
    scale_factor: float = RELEASED_SCALE_FACTOR  # latents are divided by it before decoding
    spacing_mm: float = 1.5  # isotropic voxel size of the decoded label map
    # classifier-free guidance on the size context, u + s·(c − u) with u the all-"don't care" context; 0 = none,
    # as released. maisi's own: only a UNet trained with context dropout (`maisi train mask --context-dropout`).
    guidance_scale: float = 0.0

    def __post_init__(self) -> None:
        ae, unet = self.autoencoder, self.unet
        if ae.in_channels != BITS or ae.out_channels != NUM_CLASSES:
            _fail(f"MaskGenConfig.autoencoder: in_channels must be {BITS} (bit planes) and out_channels "
                  f"{NUM_CLASSES} (classes), got {ae.in_channels} and {ae.out_channels}")
        if not ae.latent_channels == unet.in_channels == unet.out_channels == self.latent_shape[0]:
            _fail(f"MaskGenConfig: the UNet works on the mask latent: unet in/out channels ({unet.in_channels}/"
                  f"{unet.out_channels}), latent_shape[0] ({self.latent_shape[0]}) and autoencoder.latent_channels "
                  f"({ae.latent_channels}) must be equal")
        if unet.cross_attention_dim != CONTEXT_SIZE:
            _fail(f"MaskGenConfig.unet: cross_attention_dim must be {CONTEXT_SIZE} (the size vector), "
                  f"got {unet.cross_attention_dim}")
        if unet.include_spacing_input or unet.include_region_input or unet.num_class_embeds is not None:
            _fail("MaskGenConfig.unet: the mask UNet takes the size context only: set include_spacing_input=False, "
                  "include_region_input=False and num_class_embeds=None")
        spatial = self.latent_shape[1:]
        if len(spatial) != unet.spatial_dims or any(s < 1 or s % unet.downsample_factor for s in spatial):
            _fail(f"MaskGenConfig.latent_shape: need {unet.spatial_dims} spatial sizes, each a positive multiple "
                  f"of {unet.downsample_factor} (the UNet downsamples), got {self.latent_shape}")
        if not self.scale_factor > 0:
            _fail(f"MaskGenConfig.scale_factor must be > 0, got {self.scale_factor}")
        if not self.spacing_mm > 0:
            _fail(f"MaskGenConfig.spacing_mm must be > 0, got {self.spacing_mm}")
        if not self.guidance_scale >= 0:
            _fail(f"MaskGenConfig.guidance_scale must be >= 0 (0: no guidance), got {self.guidance_scale}")

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Spatial size of the decoded label map."""
        return tuple(s * self.autoencoder.downsample_factor for s in self.latent_shape[1:])


# The released networks (config_network_ddpm.json: mask_generation_autoencoder_def / _diffusion_def).
MASK_AUTOENCODER = AutoencoderConfig(
    in_channels=BITS, out_channels=NUM_CLASSES, channels=(32, 64, 128), num_res_blocks=(1, 2, 2),
    num_splits=8, split_axis=1, upsample_mode="transposed_conv",
)
MASK_UNET = UNetConfig(  # MONAI's plain DiffusionModelUNet
    channels=(64, 128, 256, 512), attention_levels=(False, False, True, True), num_head_channels=(0, 0, 32, 32),
    num_res_blocks=2, resblock_updown=False, include_fc=True, include_spacing_input=False,
    include_region_input=False, num_class_embeds=None, cross_attention_dim=CONTEXT_SIZE, upcast_attention=True,
)
MASK_SCHEDULER = SchedulerConfig(kind="ddpm", num_inference_steps=1000, use_timestep_transform=False)

MASK_PRESETS: dict[str, MaskGenConfig] = {
    "mask-ct": MaskGenConfig(),
    # tests and a model trained on CPU from phantoms: 64³ label maps at 6 mm (a 384 mm field of view)
    "mask-tiny": MaskGenConfig(
        name="mask-tiny",
        autoencoder=AutoencoderConfig(
            in_channels=BITS, out_channels=NUM_CLASSES, channels=(8, 16, 16), num_res_blocks=(1, 1, 1),
            norm_num_groups=4, upsample_mode="transposed_conv",
        ),
        unet=UNetConfig(
            channels=(16, 16, 32, 32), attention_levels=(False, False, True, True), num_head_channels=(0, 0, 16, 16),
            num_res_blocks=1, norm_num_groups=8, resblock_updown=False, include_fc=True,
            include_spacing_input=False, num_class_embeds=None, cross_attention_dim=CONTEXT_SIZE,
            upcast_attention=True, context_embedding=True,
        ),
        # rectified flow: its velocity target holds the clean latent at every noise level, where the released
        # ε-prediction makes the coarse layout (the organ sizes) a sliver of the loss; phantom UNets trained with
        # ε ignored the size context (docs/mask-generation.md)
        scheduler=SchedulerConfig(kind="rflow", num_inference_steps=30, use_timestep_transform=False),
        latent_shape=(4, 16, 16, 16),
        scale_factor=1.0,
        spacing_mm=6.0,
    ),
}


def mask_preset(name: str) -> MaskGenConfig:
    """A named mask-generation preset; unknown names raise ValueError listing them."""
    if name not in MASK_PRESETS:
        raise ValueError(f"unknown mask-generation preset {name!r}; choose one of {sorted(MASK_PRESETS)}")
    return MASK_PRESETS[name]
