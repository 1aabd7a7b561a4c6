"""Shared helpers of the pipeline, mask-generation and service tests: tiny random models (a maisi model folder or
NVIDIA's released .pt layout), fast generation requests and a tiny mask database in NVIDIA's released format."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from maisi.config import preset
from maisi.io.checkpoint import save_pretrained
from maisi.io.volume import affine_from_spacing, write_volume
from maisi.networks import build
from maisi.networks.controlnet import ControlNet
from maisi.pipeline.validation import GenerationRequest

FAST = dict(size=(32, 32, 32), spacing=(8.0, 8.0, 8.0), steps=1, quality_check=False, body_region=("chest",))


def req(**change) -> GenerationRequest:
    return GenerationRequest(**{**FAST, **change})


def tiny_networks(seed: int = 0) -> dict[str, torch.nn.Module]:
    """Tiny random networks whose zero-initialised layers (UNet output, ControlNet zero convs, residual convs)
    are randomised too, so that every output depends on the noise, the timestep and the mask."""
    cfg = preset("tiny")
    torch.manual_seed(seed)
    unet = build("unet", cfg)
    nets = {"autoencoder": build("autoencoder", cfg), "unet": unet,
            "controlnet": ControlNet.from_unet(unet, cfg.controlnet)}
    with torch.no_grad():
        for net in nets.values():
            for p in net.parameters():
                if not p.any():
                    torch.nn.init.normal_(p, std=0.05)
    return nets


def save_tiny_model(folder: Path, released: bool = False) -> list[Path]:
    """The tiny networks as a project model folder, or as NVIDIA's three .pt files (released layouts)."""
    nets, cfg = tiny_networks(), preset("tiny")
    if not released:
        save_pretrained(folder / "autoencoder", nets["autoencoder"], cfg, "autoencoder")
        save_pretrained(folder / "unet", nets["unet"], cfg, "unet", extra={"scale_factor": 1.0})
        save_pretrained(folder / "controlnet", nets["controlnet"], cfg, "controlnet")
        return [folder]
    files = [folder / "autoencoder_v1.pt", folder / "diff_unet_3d_rflow-ct.pt", folder / "controlnet_3d_rflow-ct.pt"]
    torch.save(nets["autoencoder"].state_dict(), files[0])
    torch.save({"unet_state_dict": nets["unet"].state_dict(), "scale_factor": torch.tensor(1.0)}, files[1])
    torch.save({"controlnet_state_dict": nets["controlnet"].state_dict()}, files[2])
    return files



RELEASED = "flexible_size_and_spacing_4000"


def block_label(n: int, ids: tuple[int, ...], centred: bool = False) -> np.ndarray:
    """An n³ body (200) holding one block per id, side by side along x (or one block at the centre)."""
    lab = np.zeros((n,) * 3, np.uint8)
    lab[n // 10:-(n // 10)] = 200
    for j, i in enumerate(ids):
        x = slice(n * 2 // 5, n * 3 // 5) if centred else slice(n * (3 + 6 * j) // 20, n * (6 + 6 * j) // 20)
        lab[x, n * 2 // 5:n * 3 // 5, n * 2 // 5:n * 3 // 5] = i
    return lab


def make_released_db(root: Path, zipped: bool = True) -> Path:
    """A tiny database in NVIDIA's format (datasets/candidate_masks_<name>.json + all_masks_<name>.zip whose
    members sit under all_masks_<name>/, as scripts/find_masks.py extracts and reads them); returns datasets/."""
    specs = [  # name, voxels per axis, spacing (mm), top and bottom region, organ ids
        ("a", 32, 8.0, 1, 2, (1, 28)),  # chest to abdomen, 256 mm
        ("b", 16, 8.0, 2, 2, (1,)),  # abdomen, 128 mm, the requested spacing
        ("c", 32, 8.0, 2, 2, (1, 26)),  # abdomen with a hepatic tumour, 256 mm
        ("d", 64, 4.0, 2, 2, (1,)),  # abdomen, 256 mm, finer
        ("e", 32, 8.0, 1, 1, (28,)),  # chest only
    ]
    datasets, folder = root / "datasets", f"all_masks_{RELEASED}"
    (datasets / "tmp").mkdir(parents=True)
    entries = []
    with zipfile.ZipFile(datasets / f"{folder}.zip", "w") as zf:
        for name, n, sp, top, bottom, ids in specs:
            tmp = datasets / "tmp" / f"{name}.nii.gz"
            write_volume(tmp, block_label(n, ids), affine_from_spacing(sp), np.uint8)
            zf.write(tmp, f"{folder}/{name}/pseudo_label.nii.gz")
            entries.append({"pseudo_label_filename": f"{name}/pseudo_label.nii.gz", "label_list": sorted({*ids, 200}),
                            "dim": [n] * 3, "spacing": [sp] * 3,
                            "top_region_index": [int(i == top) for i in range(4)],
                            "bottom_region_index": [int(i == bottom) for i in range(4)]})
    (datasets / f"candidate_masks_{RELEASED}.json").write_text(json.dumps(entries))
    if not zipped:
        with zipfile.ZipFile(datasets / f"{folder}.zip") as zf:
            zf.extractall(datasets)
        (datasets / f"{folder}.zip").unlink()
    return datasets
