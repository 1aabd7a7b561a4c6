"""ControlNet training: a frozen UNet, tumour-weighted L1, the region-contrastive loss and bitwise resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from maisi.training.controlnet import ControlNetStage, replace_tumours, tumour_roi
from train_support import assert_bitwise_equal, export_weights, latent_datalist, metrics, state_weights, train

FAST = ["--batch-size", "2", "--lr", "2e-3", "--log-every", "2"]


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    from maisi.config import preset
    from maisi.io.checkpoint import save_pretrained
    from maisi.networks import build

    torch.manual_seed(0)
    unet = build("unet", preset("tiny"))
    with torch.no_grad():  # a fresh UNet's zero-initialised convs would block every gradient
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("unet") / "export"
    save_pretrained(folder, unet, preset("tiny"), "unet", extra={"scale_factor": 0.8})
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return latent_datalist(tmp_path_factory.mktemp("cn"), n=2, labels=True)


def held_out_loss(controlnet, unet, data, scale: float) -> float:
    """Tumour-weighted L1 of UNet + ControlNet on 16 fixed (noise, t) draws of every case."""
    from maisi.config import preset
    from maisi.data.datalist import read_datalist
    from maisi.data.datasets import LatentCases
    from maisi.diffusion.schedulers import make_scheduler
    from maisi.training.diffusion import noised
    from maisi.training.losses import weighted_l1

    cases = LatentCases(read_datalist(data), 4, with_label=True)
    scheduler = make_scheduler(preset("tiny").scheduler)
    losses = []
    with torch.no_grad():
        for i in range(len(cases)):
            item = cases.load(i, torch.Generator())
            n = 16
            z = item["latent"][None].repeat(n, 1, 1, 1, 1) * scale
            label = item["label"][None].repeat(n, 1, 1, 1, 1)
            x_t, t, target = noised(scheduler, z, torch.arange(n) + 10_000, seed=123)
            modality = item["modality"].repeat(n)
            down, mid = controlnet(x_t, t, label, modality=modality)
            pred = unet(x_t, t, spacing=item["spacing"][None].repeat(n, 1), modality=modality,
                        down_residuals=down, mid_residual=mid)
            losses.append(weighted_l1(pred, target, tumour_roi(label, [26], 4), 100.0).item())
    return sum(losses) / len(losses)


def test_controlnet_loss_decreases(unet_folder, data, tmp_path):
    run = tmp_path / "run"
    assert train("controlnet", "--data", str(data), "--unet", str(unet_folder), "--out", str(run),
                 "--steps", "40", *FAST) == 0
    from maisi.io.checkpoint import read_pretrained_config
    from maisi.networks import load_pretrained
    from maisi.networks.controlnet import ControlNet

    component, config, extra, _ = read_pretrained_config(run / "export")
    assert component == "controlnet" and extra["scale_factor"] == pytest.approx(0.8)
    trained = load_pretrained(run / "export")[0].eval()
    unet = load_pretrained(unet_folder)[0].eval()
    fresh = ControlNet.from_unet(unet, config.controlnet).eval()
    before, after = held_out_loss(fresh, unet, data, 0.8), held_out_loss(trained, unet, data, 0.8)
    assert after < 0.95 * before, (before, after)  # deterministic: a fresh ControlNet changes nothing
    assert len(metrics(run)) == 20


def test_controlnet_region_contrastive_loss_is_logged(unet_folder, data, tmp_path):
    run = tmp_path / "run"
    assert train("controlnet", "--data", str(data), "--unet", str(unet_folder), "--out", str(run),
                 "--steps", "4", "--contrastive-weight", "0.01", "--tumor-labels", "hepatic tumor", *FAST) == 0
    assert all("loss_contrastive" in r for r in metrics(run))


def test_controlnet_resume_after_interruption_is_bitwise(unet_folder, data, tmp_path, monkeypatch):
    """4 steps straight, or killed at step 3 and resumed from the step-2 checkpoint: the same weights, AdamW
    moments and scale factor, bit for bit (the README's promise for all three stages)."""
    args = ["--data", str(data), "--unet", str(unet_folder), "--steps", "4", "--checkpoint-every", "2", *FAST,
            "--batch-size", "1", "--latent", "sample"]  # z = μ + σ·ε: a random draw that must repeat too
    assert train("controlnet", "--out", str(tmp_path / "a"), *args) == 0
    real = ControlNetStage.train_step

    def dies_at_step_3(self, batch, step):
        if step == 3:
            raise RuntimeError("killed")
        return real(self, batch, step)

    monkeypatch.setattr(ControlNetStage, "train_step", dies_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        train("controlnet", "--out", str(tmp_path / "b"), *args)
    monkeypatch.setattr(ControlNetStage, "train_step", real)
    assert train("controlnet", "--out", str(tmp_path / "b"), *args) == 0
    assert [r["step"] for r in metrics(tmp_path / "b")] == [2, 4]
    assert_bitwise_equal(export_weights(tmp_path / "a"), export_weights(tmp_path / "b"))
    assert_bitwise_equal(state_weights(tmp_path / "a"), state_weights(tmp_path / "b"))


def test_tumour_roi_and_host_replacement():
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[..., 1:7, 1:7, 1:7] = 1
    label[..., 5, 5, 5] = 26
    roi = tumour_roi(label, [26], 4)
    assert roi.shape == (1, 1, 2, 2, 2) and roi.sum() == 1 and roi[0, 0, 1, 1, 1] == 1
    assert (replace_tumours(label, [26]) == 26).sum() == 0 and replace_tumours(label, [26])[..., 5, 5, 5] == 1


def test_controlnet_refuses_a_non_unet_checkpoint(unet_folder, data, tmp_path, capsys):
    code = train("controlnet", "--data", str(data), "--unet", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "run"), "--steps", "2", "--config", "tiny", *FAST)
    assert code == 2
    code = train("controlnet", "--data", str(data), "--unet", str(unet_folder), "--out", str(tmp_path / "r2"),
                 "--steps", "2", "--contrastive-weight", "0.01", "--tumor-labels", "liver", *FAST)
    assert code == 2 and "no host is known" in capsys.readouterr().err


def _spoil(folder, case: str) -> tuple[dict, str]:
    """Entry 1 of the datalist in `folder` made bad in one way: (the entry's new fields, the file to be named)."""
    from maisi.io.volume import affine_from_spacing, write_volume

    label = folder / "case1_label.nii.gz"
    if case == "label-shape":
        write_volume(label, np.ones((16, 16, 16), np.uint8), affine_from_spacing(1.5), np.uint8)
        return {}, label.name
    if case == "image-as-latent":  # a 3D NIfTI where the latent belongs
        return {"latent": "case0_label.nii.gz", "spacing": [1.5, 1.5, 2.0]}, "case0_label.nii.gz"
    if case == "truncated-label":
        label.write_bytes(label.read_bytes()[:200])
        return {}, label.name
    if case == "garbage-safetensors":
        (folder / "noise.safetensors").write_bytes(np.random.default_rng(0).bytes(4000))
        return {"latent": "noise.safetensors", "spacing": [1.5, 1.5, 2.0]}, "noise.safetensors"
    if case == "garbage-nifti-latent":
        (folder / "noise_emb.nii.gz").write_bytes(np.random.default_rng(0).bytes(4000))
        return {"latent": "noise_emb.nii.gz", "spacing": [1.5, 1.5, 2.0]}, "noise_emb.nii.gz"
    if case == "upward-span":
        return {"top_region_index": "abdomen", "bottom_region_index": "chest"}, "entry 1"
    values = np.zeros((32, 32, 32), np.float32)
    values[4:8, 4:8, 4:8] = 1.5 if case == "fractional-label" else 250  # 250: no MAISI id
    write_volume(label, values, affine_from_spacing(1.5), np.float32 if case == "fractional-label" else np.uint8)
    return {}, label.name


BAD_DATA = {
    "label-shape": "label shape (16, 16, 16) is not 4× the latent's (8, 8, 8)",
    "image-as-latent": "a NIfTI latent must be X×Y×Z×C (channels last), got shape (32, 32, 32)",
    "truncated-label": "case1_label.nii.gz: ",
    "garbage-safetensors": "cannot read latents (SafetensorError",
    "garbage-nifti-latent": "cannot read latents (ImageFileError",
    "upward-span": "body region span 'abdomen-chest' goes upwards",
    "fractional-label": "a label map must hold integer ids, found fractional values",
    "unknown-id": "label ids [250] are not in the MAISI vocabulary",
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_controlnet_refuses_bad_training_data_before_the_run_folder(unet_folder, data, tmp_path, capsys, case):
    """Regression: these were found only when the loader read the file, after config.json and run.json were
    written, some (a garbage .nii.gz latent) as a traceback; labels the generator refuses (fractional values, ids
    outside the vocabulary) and a body region span that goes upwards were trained on. Now each is one error line
    naming the entry or file, before the run folder exists."""
    folder = tmp_path / "data"
    shutil.copytree(data.parent, folder)
    entries = json.loads((folder / data.name).read_text())["training"]
    fields, named = _spoil(folder, case)
    entries[1].update(fields)
    (folder / data.name).write_text(json.dumps({"training": entries}))
    run = tmp_path / "run"
    code = train("controlnet", "--data", str(folder / data.name), "--unet", str(unet_folder), "--out", str(run),
                 "--steps", "1", *FAST)
    err = capsys.readouterr().err
    assert code == 2 and BAD_DATA[case] in err and named in err, err
    assert "Traceback" not in err and "case0_latent" not in err  # the good entry is not blamed
    assert not run.exists()
