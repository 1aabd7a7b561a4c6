"""Shared helpers of the tests/test_train_*.py files: tiny phantom and latent datalists, CLI runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from maisi.cli import main


def phantom_datalist(folder: Path, n: int = 3, size: int = 32, tumors: tuple[str, ...] = ()) -> Path:
    """n small CT phantoms written as NIfTI with their datalist."""
    from maisi.data.phantom import make_phantom, write_datalist, write_phantom

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        region = ("chest", "abdomen", "pelvis")[i % 3]
        p = make_phantom(region, size=size, spacing=256.0 / size, seed=i + 1, tumors=tumors)
        entries.append(write_phantom(p, folder, f"case{i}"))
    return write_datalist(folder / "datalist.json", entries)


def latent_datalist(folder: Path, n: int = 3, shape: tuple[int, ...] = (8, 8, 8), channels: int = 4,
                    labels: bool = False, spacing: bool = True, seed: int = 0) -> Path:
    """n smooth random latents (mu, sigma safetensors + JSON sidecar); with `labels`, image-size masks
    holding a liver (1) with a hepatic tumour (26) inside."""
    from maisi.io.volume import affine_from_spacing, write_volume

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for i in range(n):
        mu = torch.nn.functional.avg_pool3d(torch.randn(1, channels, *shape, generator=g), 3, 1, 1)[0] * 3
        sigma = torch.full_like(mu, 0.05)
        path = folder / f"case{i}_latent.safetensors"
        save_file({"mu": mu.contiguous(), "sigma": sigma}, str(path))
        meta = {"dim": [4 * s for s in shape], "top_region_index": [0, 0, 1, 0],
                "bottom_region_index": [0, 0, 1, 0], "modality": "ct"}
        if spacing:
            meta["spacing"] = [1.5, 1.5, 2.0]
        (folder / f"{path.name}.json").write_text(json.dumps(meta))
        entry = {"latent": path.name}
        if labels:
            img = [4 * s for s in shape]
            lab = np.zeros(img, np.uint8)
            lab[2:-2, 2:-2, 2:-2] = 1
            c = [s // 2 + (i % 2) * 2 for s in img]
            lab[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] = 26
            write_volume(folder / f"case{i}_label.nii.gz", lab, affine_from_spacing(1.5), np.uint8)
            entry["label"] = f"case{i}_label.nii.gz"
        entries.append(entry)
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    return path


def train(*args: str) -> int:
    return main(["train", *args, "--no-progress", "--no-tensorboard"])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def export_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def state_weights(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest training checkpoint (weights and optimizer moments), flattened."""
    from maisi.training.state import list_checkpoints

    state = torch.load(list_checkpoints(run)[-1][1], weights_only=True)
    out = {}

    def walk(prefix: str, obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for k, v in enumerate(obj):
                walk(f"{prefix}.{k}", v)

    walk("", {k: state[k] for k in ("modules", "optimizers", "extra")})
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def mean_loss(records: list[dict], key: str = "loss") -> float:
    return float(np.mean([r[key] for r in records]))
