"""The mask generation model (REFERENCE §8): new anatomy label maps conditioned on organ and tumour sizes."""

from maisi.config import MASK_PRESETS, MaskGenConfig, mask_preset
from maisi.maskgen.context import (
    ANATOMY_SIZE_NAMES,
    AnatomySizeError,
    check_request,
    complete_context,
    load_conditions,
    target_tumor,
)
from maisi.maskgen.encoding import decode_logits, encode_label_map
from maisi.maskgen.networks import (
    MaskModel,
    build_mask_autoencoder,
    build_mask_unet,
    load_mask_autoencoder,
    load_mask_model,
    load_mask_unet,
)
from maisi.maskgen.postprocess import postprocess_mask
from maisi.maskgen.sampling import decode_mask, generate_mask, sample_mask_latent

__all__ = [
    "ANATOMY_SIZE_NAMES", "MASK_PRESETS", "AnatomySizeError", "MaskGenConfig", "MaskModel", "build_mask_autoencoder",
    "build_mask_unet", "check_request", "complete_context", "decode_logits", "decode_mask", "encode_label_map",
    "generate_mask", "load_conditions", "load_mask_autoencoder", "load_mask_model", "load_mask_unet", "mask_preset",
    "postprocess_mask", "sample_mask_latent", "target_tumor",
]
