"""VAE-GAN training: the loss falls, an interrupted run resumes bitwise, bad input is refused clearly."""

from __future__ import annotations

import json

import pytest
import torch

from maisi.training.vae import ENCODER_PARTS, VAEStage, recon_loss
from train_support import (
    assert_bitwise_equal,
    export_weights,
    mean_loss,
    metrics,
    phantom_datalist,
    state_weights,
    train,
)

FAST = ["--config", "tiny", "--patch", "16", "--perceptual-weight", "0", "--disc-layers", "1",
        "--disc-channels", "8", "--batch-size", "2", "--lr", "1e-3", "--log-every", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return phantom_datalist(tmp_path_factory.mktemp("phantoms"), n=3, size=32)


def test_vae_loss_decreases_and_exports(data, tmp_path):
    run = tmp_path / "run"
    assert train("vae", "--data", str(data), "--out", str(run), "--steps", "40", *FAST) == 0
    recs = metrics(run)
    assert len(recs) == 20 and {"loss_recon", "loss_kl", "loss_adv", "loss_disc"} <= recs[0].keys()
    assert mean_loss(recs[-3:], "loss_recon") < 0.7 * mean_loss(recs[:3], "loss_recon")
    from maisi.networks import load_pretrained

    model, config, _ = load_pretrained(run / "export")
    assert config.name == "tiny" and json.loads((run / "config.json").read_text())["name"] == "tiny"
    x = torch.rand(1, 1, 16, 16, 16)
    assert model(x)[0].shape == x.shape


@pytest.mark.parametrize("augment", [[], ["--augment", "standard"]], ids=["plain", "augmented"])
def test_vae_resume_after_interruption_is_bitwise(data, tmp_path, monkeypatch, augment):
    """Augmentation is drawn per (seed, sample) too, so an augmented run resumes bitwise as well."""
    args = ["--data", str(data), "--steps", "10", "--checkpoint-every", "4", "--lr-power", "1", *FAST, *augment]
    train("vae", "--out", str(tmp_path / "a"), *args)

    real = VAEStage.train_step

    def dies_at_step_6(self, batch, step):
        if step == 6:
            raise RuntimeError("killed")
        return real(self, batch, step)

    monkeypatch.setattr(VAEStage, "train_step", dies_at_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        train("vae", "--out", str(tmp_path / "b"), *args)
    monkeypatch.setattr(VAEStage, "train_step", real)
    assert [r["step"] for r in metrics(tmp_path / "b")] == [2, 4, 6]  # logged after the last checkpoint (4)
    train("vae", "--out", str(tmp_path / "b"), *args)  # the same command resumes at step 4

    assert [r["step"] for r in metrics(tmp_path / "b")] == [2, 4, 6, 8, 10]
    assert_bitwise_equal(export_weights(tmp_path / "a"), export_weights(tmp_path / "b"))
    assert_bitwise_equal(state_weights(tmp_path / "a"), state_weights(tmp_path / "b"))


def test_vae_augment_flag_changes_the_training_batches(data, tmp_path, monkeypatch):
    """`--augment` reaches the batches the stage trains on: the same samples (same crops, as the augmentation
    draws after the crop) differ from the plain run's, and stay in [0, 1]."""
    real, seen = VAEStage.train_step, {}

    def record(self, batch, step):
        seen.setdefault(run, []).append(batch["image"].clone())
        return real(self, batch, step)

    monkeypatch.setattr(VAEStage, "train_step", record)
    for run in ("none", "standard"):
        assert train("vae", "--data", str(data), "--out", str(tmp_path / run), "--steps", "3", *FAST,
                     "--adv-weight", "0", "--augment", run) == 0
    plain, augmented = torch.stack(seen["none"]), torch.stack(seen["standard"])
    assert plain.shape == augmented.shape == (3, 2, 1, 16, 16, 16)
    assert 0.0 <= float(augmented.min()) and float(augmented.max()) <= 1.0
    changed = [not torch.equal(p, a) for p, a in zip(plain.flatten(0, 1), augmented.flatten(0, 1))]
    assert sum(changed) >= 3, changed


def test_vae_learning_rate_decays_polynomially_to_zero(data, tmp_path):
    from maisi.training.loop import poly_lr

    common = ["--data", str(data), "--steps", "8", *FAST, "--adv-weight", "0"]
    decayed, constant = tmp_path / "decayed", tmp_path / "constant"
    assert train("vae", *common, "--out", str(decayed), "--lr-power", "2") == 0
    logged = [r["lr"] for r in metrics(decayed)]  # each record: the mean over its two steps
    expected = [(poly_lr(1e-3, s, 8, 2) + poly_lr(1e-3, s + 1, 8, 2)) / 2 for s in (0, 2, 4, 6)]
    assert logged == pytest.approx(expected, rel=1e-6) and logged[-1] < 0.05 * logged[0]
    assert train("vae", *common, "--out", str(constant)) == 0  # the default: no decay
    assert [r["lr"] for r in metrics(constant)] == pytest.approx([1e-3] * 4)


def test_vae_patch_curriculum(data, tmp_path):
    from maisi.data.datalist import read_datalist
    from maisi.data.datasets import ImagePatches

    patches = ImagePatches(read_datalist(data), [(0, 8), (3, 16)], batch_size=2)
    g = torch.Generator().manual_seed(0)
    assert patches.load(0, g, sample=5)["image"].shape == (1, 8, 8, 8)  # step 2
    assert patches.load(0, g, sample=6)["image"].shape == (1, 16, 16, 16)  # step 3
    run = tmp_path / "run"
    assert train("vae", "--data", str(data), "--out", str(run), "--steps", "4",
                 *FAST[:2], *FAST[4:], "--patch", "12", "16", "--patch-switch", "2") == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "datalist is empty"),
        ("missing", "missing file"),
        ("no-datalist", "no datalist"),
        ("bad-switch", "--patch-switch"),
        ("bad-config", "unknown preset"),
        ("bad-lr-power", "--lr-power must be >= 0"),
        ("bad-bright", "--bright-above must be in [0, 1]"),
    ],
)
def test_vae_bad_input_is_a_clean_error(data, tmp_path, capsys, case, message):
    datalist = data
    extra: list[str] = []
    if case == "empty":
        datalist = tmp_path / "empty.json"
        datalist.write_text('{"training": []}')
    elif case == "missing":
        datalist = tmp_path / "missing.json"
        datalist.write_text('{"training": [{"image": "nowhere.nii.gz"}]}')
    elif case == "no-datalist":
        datalist = tmp_path / "absent.json"
    elif case == "bad-switch":
        extra = ["--patch", "8", "16"]
    elif case == "bad-lr-power":
        extra = ["--lr-power", "-1"]
    elif case == "bad-bright":
        extra = ["--bright-above", "1.5"]
    else:
        extra = ["--config", "no-such-preset"]
    code = train("vae", "--data", str(datalist), "--out", str(tmp_path / "run"), "--steps", "2", *FAST, *extra)
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "patch, message",
    [
        ("30", "--patch 30 must be a positive multiple of 4 (the autoencoder downsamples by 4), e.g. 28 or 32"),
        ("2048", "--patch 2048 is larger than every training volume (the largest edge is 32 voxels)"),
    ],
    ids=["not-a-multiple-of-4", "larger-than-every-volume"],
)
def test_vae_patch_is_checked_against_the_autoencoder_and_the_volumes_before_the_run_folder(
        data, tmp_path, capsys, patch, message):
    """Regression: --patch 30 failed in the encoder, naming no flag, and --patch 2048 in numpy (a 32 GiB array,
    with a traceback), both after the run folder was made. A patch larger than a volume along an axis is padded
    (test_datasets); one larger than every volume's longest edge is refused."""
    run = tmp_path / "run"
    assert train("vae", "--data", str(data), "--out", str(run), "--steps", "1", *FAST, "--patch", patch) == 2
    err = capsys.readouterr().err
    assert f"maisi train: error: {message}" in err and "Traceback" not in err
    assert not run.exists()


def test_vae_refuses_a_run_folder_of_another_config(data, tmp_path, capsys):
    run = tmp_path / "run"
    train("vae", "--data", str(data), "--out", str(run), "--steps", "1", *FAST)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"preset": "tiny", "autoencoder": {"channels": [4, 8, 8]}}))
    assert train("vae", "--data", str(data), "--out", str(run), "--steps", "2", *FAST, "--config", str(other)) == 2
    assert "another model config" in capsys.readouterr().err
    # a config written before maisi added a field (here with its default) is the same config: the run resumes
    saved = json.loads((run / "run.json").read_text())
    del saved["config"]["autoencoder"]["upsample_mode"]
    (run / "run.json").write_text(json.dumps(saved))
    assert train("vae", "--data", str(data), "--out", str(run), "--steps", "2", *FAST) == 0
    assert [r["step"] for r in metrics(run)][-1] == 2


def test_freeze_encoder_trains_the_decoder_only(data, tmp_path):
    """A decoder-only fine-tune keeps the encoder (so the latents, and models trained on them) bit for bit."""
    base = tmp_path / "base"
    assert train("vae", "--data", str(data), "--out", str(base), "--steps", "4", *FAST, "--adv-weight", "0") == 0
    tuned = tmp_path / "tuned"
    assert train("vae", "--data", str(data), "--out", str(tuned), "--steps", "6", *FAST, "--adv-weight", "0",
                 "--init", str(base / "export"), "--freeze-encoder", "--bright-weight", "4") == 0
    before, after = export_weights(base), export_weights(tuned)
    frozen = [k for k in before if k.split(".")[0] in ENCODER_PARTS]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in trained) > len(trained) // 2


def test_bright_weight_counts_voxels_above_the_threshold_more():
    x = torch.tensor([0.1, 0.1, 0.9, 0.9])
    recon = torch.tensor([0.2, 0.1, 0.5, 0.9])  # errors 0.1, 0, 0.4, 0
    assert recon_loss(recon, x, "l1").item() == pytest.approx(0.5 / 4)
    assert recon_loss(recon, x, "l1", bright_weight=4).item() == pytest.approx((0.1 + 5 * 0.4) / 4)
    assert recon_loss(recon, x, "mse", bright_weight=4, bright_above=0.95).item() == pytest.approx(0.17 / 4)
