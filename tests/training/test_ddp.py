"""torchrun with 2 CPU processes (gloo): the averaged gradient equals the single-process one, and the CLI trains."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import maisi
from train_support import latent_datalist, phantom_datalist

pytestmark = pytest.mark.slow  # two torchrun launches: ~30 s on 2 cores

SCRIPT = textwrap.dedent('''
    """One training step of the VAE-GAN and the diffusion stage; rank 0 saves the gradients."""
    import sys
    import torch
    from torch.utils.data import default_collate
    from maisi.config import preset
    from maisi.networks import build
    from maisi.training import distributed as D
    from maisi.data.datalist import read_datalist
    from maisi.data.datasets import ImagePatches, LatentCases
    from maisi.training.diffusion import DiffusionOptions, DiffusionStage
    from maisi.training.loop import SampleDataset
    from maisi.training.state import batch_samples
    from maisi.training.vae import VAEOptions, VAEStage

    images, latents, out = sys.argv[1:4]
    world = D.init("cpu")
    config = preset("tiny")
    batch = 4

    def step(stage, source, model):
        ds = SampleDataset(source, seed=0)
        stage.train_step(default_collate([ds[s] for s in batch_samples(0, batch, world.rank, world.size)]), 0)
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    vae = VAEStage(build("autoencoder", config), config,
                   VAEOptions(perceptual_weight=0, disc_layers=1, disc_channels=8), world, seed=0)
    grads = {"vae." + k: v for k, v in step(vae, ImagePatches(read_datalist(images), [(0, 16)], batch), vae.autoencoder).items()}
    grads.update({"disc." + k: p.grad.clone() for k, p in vae.disc_module.named_parameters()})
    torch.manual_seed(0)
    diff = DiffusionStage(build("unet", config), config, DiffusionOptions(), world, steps=10, scale_factor=1.0)
    grads.update({"unet." + k: v for k, v in step(diff, LatentCases(read_datalist(latents), 4), diff.unet).items()})
    if world.is_main:
        torch.save(grads, out)
    D.shutdown()
''')


def _env() -> dict[str, str]:
    src = str(Path(maisi.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_process_gradient_matches_single_process(tmp_path):
    images = phantom_datalist(tmp_path / "img", n=3, size=32)
    latents = latent_datalist(tmp_path / "lat", n=3)
    script = tmp_path / "one_step.py"
    script.write_text(SCRIPT)
    _torchrun(1, str(script), str(images), str(latents), str(tmp_path / "g1.pt"))
    _torchrun(2, str(script), str(images), str(latents), str(tmp_path / "g2.pt"))
    g1, g2 = torch.load(tmp_path / "g1.pt"), torch.load(tmp_path / "g2.pt")
    assert g1.keys() == g2.keys() and any(k.startswith("disc.") for k in g1) and any(k.startswith("unet.") for k in g1)
    for k in g1:
        scale = g1[k].abs().max().item() + 1e-12
        assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-5 * scale), k


def test_torchrun_cli_trains_and_only_rank0_writes(tmp_path):
    data = latent_datalist(tmp_path / "lat", n=3)
    run = tmp_path / "run"
    _torchrun(2, "-m", "maisi", "train", "diffusion", "--config", "tiny", "--data", str(data), "--out", str(run),
              "--steps", "4", "--batch-size", "2", "--checkpoint-every", "2", "--log-every", "2", "--no-progress",
              "--no-tensorboard", "--device", "cpu")
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [
        "training-state-000000002.pt", "training-state-000000004.pt"]
    assert (run / "export" / "model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
