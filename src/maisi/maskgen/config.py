"""Frozen config of the mask generation model (REFERENCE §8) and its named presets."""

from __future__ import annotations

from dataclasses import dataclass, field

from maisi.config import AutoencoderConfig, SchedulerConfig, UNetConfig

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
            upcast_attention=True,
        ),
        scheduler=SchedulerConfig(kind="ddim", num_inference_steps=50, use_timestep_transform=False),
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
