"""Diffusion training on cached latents: loss falls, scale_factor, bitwise resume, fine-tuning, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from maisi.training.diffusion import DiffusionStage, drop_modality, poly_lr
from train_support import (
    assert_bitwise_equal,
    export_weights,
    latent_datalist,
    mean_loss,
    metrics,
    state_weights,
    train,
)

FAST = ["--config", "tiny", "--batch-size", "2", "--lr", "2e-3", "--log-every", "2", "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return latent_datalist(tmp_path_factory.mktemp("latents"), n=4)


def test_diffusion_loss_decreases_and_exports_scale_factor(tmp_path):
    data = latent_datalist(tmp_path / "one", n=1)  # one case: the velocity is learnable exactly
    run = tmp_path / "run"
    assert train("diffusion", "--data", str(data), "--out", str(run), "--steps", "60", *FAST) == 0
    recs = metrics(run)
    assert mean_loss(recs[-5:]) < 0.9 * mean_loss(recs[:2])  # noise alone stays within ~3 %
    assert recs[-1]["lr"] < recs[0]["lr"]  # polynomial decay
    from maisi.networks import load_pretrained

    _, config, extra = load_pretrained(run / "export")
    lat = torch.stack([load_file(str(p))["mu"] for p in sorted(data.parent.glob("*.safetensors"))])
    assert extra["scale_factor"] == pytest.approx(1 / lat.double().std(unbiased=False).item(), rel=1e-5)
    assert config.name == "tiny"


def test_diffusion_resume_after_interruption_is_bitwise(data, tmp_path, monkeypatch, capsys):
    args = ["--data", str(data), "--steps", "10", "--checkpoint-every", "4", "--latent", "sample", *FAST]
    train("diffusion", "--out", str(tmp_path / "a"), *args)
    real = DiffusionStage.train_step

    def dies_at_step_7(self, batch, step):
        if step == 7:
            raise RuntimeError("killed")
        return real(self, batch, step)

    monkeypatch.setattr(DiffusionStage, "train_step", dies_at_step_7)
    with pytest.raises(RuntimeError, match="killed"):
        train("diffusion", "--out", str(tmp_path / "b"), *args)
    monkeypatch.setattr(DiffusionStage, "train_step", real)
    capsys.readouterr()
    train("diffusion", "--out", str(tmp_path / "b"), *args)
    assert f"resuming diffusion training at step 4 from {tmp_path / 'b'}" in capsys.readouterr().out  # the CLI's line
    assert [r["step"] for r in metrics(tmp_path / "b")] == [2, 4, 6, 8, 10]
    assert_bitwise_equal(export_weights(tmp_path / "a"), export_weights(tmp_path / "b"))
    assert_bitwise_equal(state_weights(tmp_path / "a"), state_weights(tmp_path / "b"))


def test_fine_tuning_starts_from_the_init_checkpoint(data, tmp_path, capsys):
    base = tmp_path / "base"
    train("diffusion", "--data", str(data), "--out", str(base), "--steps", "4", *FAST, "--ema-decay", "0")
    tuned = tmp_path / "tuned"
    args = ["--data", str(data), "--steps", "1", "--lr", "1e-9", "--ema-decay", "0", "--no-progress"]
    assert train("diffusion", "--out", str(tuned), "--init", str(base / "export"), *args) == 0
    a, b = export_weights(base), export_weights(tuned)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    extra = json.loads((tuned / "export" / "config.json").read_text())["extra"]
    assert extra["scale_factor"] == json.loads((base / "export" / "config.json").read_text())["extra"]["scale_factor"]

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"preset": "tiny", "unet": {"channels": [8, 8, 16, 16], "num_head_channels": [0, 0, 8, 8]}}))
    code = train("diffusion", "--out", str(tmp_path / "bad"), "--init", str(base / "export"), "--config", str(other), *args)
    assert code == 2 and "does not match" in capsys.readouterr().err


def test_modality_dropout_and_lr_schedule():
    samples = torch.arange(2000)
    dropped = drop_modality(torch.ones(2000, dtype=torch.long), samples, 0.1, seed=0)
    assert 0.07 < (dropped == 0).float().mean().item() < 0.13
    assert torch.equal(dropped, drop_modality(torch.ones(2000, dtype=torch.long), samples, 0.1, seed=0))
    assert poly_lr(1.0, 0, 10, 2) == 1.0 and poly_lr(1.0, 5, 10, 2) == pytest.approx(0.25)


@pytest.mark.parametrize("case, message", [("channels", "latent_channels = 4"), ("spacing", "no 'spacing'")])
def test_bad_latents_are_clean_errors(tmp_path, capsys, case, message):
    data = latent_datalist(tmp_path / "d", n=2, channels=3 if case == "channels" else 4, spacing=case != "spacing")
    assert train("diffusion", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2", *FAST) == 2
    assert message in capsys.readouterr().err


def test_latents_of_different_shapes_cannot_share_a_batch(tmp_path, capsys):
    a = latent_datalist(tmp_path / "a", n=1, shape=(8, 8, 8))
    b = latent_datalist(tmp_path / "b", n=1, shape=(16, 8, 8), seed=1)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"training": [{"latent": str(a.parent / "case0_latent.safetensors")},
                                              {"latent": str(b.parent / "case0_latent.safetensors")}]}))
    assert train("diffusion", "--data", str(mixed), "--out", str(tmp_path / "run"), "--steps", "2", *FAST) == 2
    assert "different shapes" in capsys.readouterr().err
    assert train("diffusion", "--data", str(mixed), "--out", str(tmp_path / "run"), "--steps", "2",
                 *FAST[:2], "--batch-size", "1") == 0
