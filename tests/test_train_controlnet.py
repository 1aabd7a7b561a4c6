"""ControlNet training: a frozen UNet, tumour-weighted L1 and the region-contrastive loss."""

from __future__ import annotations

import pytest
import torch

from maisi.training.controlnet import replace_tumours, tumour_roi
from train_support import export_weights, latent_datalist, mean_loss, metrics, train

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


def test_controlnet_loss_decreases(unet_folder, data, tmp_path):
    run = tmp_path / "run"
    assert train("controlnet", "--data", str(data), "--unet", str(unet_folder), "--out", str(run),
                 "--steps", "40", *FAST) == 0
    recs = metrics(run)
    assert mean_loss(recs[-5:]) < 0.8 * mean_loss(recs[:2])
    from maisi.io.checkpoint import load_pretrained, read_pretrained_config

    component, config, extra, _ = read_pretrained_config(run / "export")
    assert component == "controlnet" and extra["scale_factor"] == pytest.approx(0.8)
    load_pretrained(run / "export")
    assert export_weights(run)  # non-empty


def test_controlnet_region_contrastive_loss_is_logged(unet_folder, data, tmp_path):
    run = tmp_path / "run"
    assert train("controlnet", "--data", str(data), "--unet", str(unet_folder), "--out", str(run),
                 "--steps", "4", "--contrastive-weight", "0.01", "--tumor-labels", "hepatic tumor", *FAST) == 0
    assert all("loss_contrastive" in r for r in metrics(run))


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
