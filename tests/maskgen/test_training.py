"""`maisi train mask`: the autoencoder's and the UNet's losses fall on phantoms, an interrupted run resumes bitwise,
and the result is a mask model `maisi generate --anatomy-size` loads with its conditions file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from maisi.config import NUM_CLASSES, to_dict
from maisi.data.datalist import read_datalist
from maisi.data.phantom import write_datalist
from maisi.io.volume import affine_from_spacing, write_volume
from maisi.maskgen import mask_preset
from maisi.maskgen.context import CONDITIONS_FILE, load_conditions
from maisi.maskgen.encoding import to_class_index
from maisi.maskgen.networks import load_mask_model
from maisi.networks.weights import resolve
from maisi.training.mask import (
    LabelMaps,
    MaskDiffusionStage,
    MaskTrainOptions,
    drop_context,
    mask_config,
    present_dice,
    tumour_latent_voxels,
)
from train_support import assert_bitwise_equal, mean_loss, metrics, phantom_datalist, state_weights, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return phantom_datalist(tmp_path_factory.mktemp("phantoms"), n=3, size=32)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """mask-tiny on a 16³ grid at 24 mm with a two-level autoencoder: the smallest the UNet accepts (latent 8³)."""
    ae = to_dict(mask_preset("mask-tiny").autoencoder) | {"channels": [8, 8], "num_res_blocks": [1, 1]}
    path = tmp_path_factory.mktemp("cfg") / "mask.json"
    path.write_text(json.dumps({"preset": "mask-tiny", "latent_shape": [4, 8, 8, 8], "spacing_mm": 24.0,
                                "autoencoder": ae}))
    return path


def args(data, config, out, steps: int, unet_steps: int, *more: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--config", str(config), "--steps", str(steps), "--unet-steps",
            str(unet_steps), "--batch-size", "2", "--lr", "3e-3", "--unet-lr", "1e-3", "--log-every", "2",
            "--no-progress", "--no-tensorboard", *more]


@pytest.mark.slow
def test_mask_training_losses_fall_and_export_a_loadable_mask_model(data, config, tmp_path):
    run = tmp_path / "run"
    assert train("mask", *args(data, config, run, 16, 16, "--ema-decay", "0")) == 0
    ae, unet = metrics(run / "mask_autoencoder"), metrics(run / "mask_unet")
    assert len(ae) == len(unet) == 8 and {"loss_ce", "loss_kl", "accuracy"} <= ae[0].keys()
    assert mean_loss(ae[-2:], "loss_ce") < 0.5 * mean_loss(ae[:2], "loss_ce")
    assert mean_loss(unet[-3:], "loss") < mean_loss(unet[:2], "loss")
    model = load_mask_model(resolve(run))
    assert model is not None and model.config.spacing_mm == 24.0 and model.scale_factor > 0
    assert model.conditions == run / "mask_unet" / "export" / CONDITIONS_FILE
    sizes = load_conditions(model.conditions)
    assert sizes.shape == (3, 10) and (sizes[:, 1] > 0).any() and (sizes[:, 1] == -1).any()  # pelvis: no liver


@pytest.mark.slow  # ~10 s
def test_mask_training_resumes_bitwise_after_an_interruption(data, config, tmp_path, monkeypatch):
    common = args(data, config, tmp_path / "a", 4, 4, "--checkpoint-every", "2")
    assert train("mask", *common) == 0

    real = MaskDiffusionStage.train_step

    def dies_at_step_3(self, batch, step):
        if step == 3:
            raise RuntimeError("killed")
        return real(self, batch, step)

    monkeypatch.setattr(MaskDiffusionStage, "train_step", dies_at_step_3)
    resumed = args(data, config, tmp_path / "b", 4, 4, "--checkpoint-every", "2")
    with pytest.raises(RuntimeError, match="killed"):
        train("mask", *resumed)
    monkeypatch.setattr(MaskDiffusionStage, "train_step", real)
    assert [r["step"] for r in metrics(tmp_path / "b" / "mask_unet")] == [2]
    assert train("mask", *resumed) == 0  # the same command: the autoencoder is done, the UNet resumes at step 2

    for phase in ("mask_autoencoder", "mask_unet"):
        a, b = tmp_path / "a" / phase, tmp_path / "b" / phase
        assert_bitwise_equal(load_file(str(a / "export" / "model.safetensors")),
                             load_file(str(b / "export" / "model.safetensors")))
        assert_bitwise_equal(state_weights(a), state_weights(b))
    assert [r["step"] for r in metrics(tmp_path / "b" / "mask_unet")] == [2, 4]


def test_dice_weight_adds_a_soft_dice_term_to_the_autoencoder_loss(data, config, tmp_path):
    run = tmp_path / "run"
    assert train("mask", *args(data, config, run, 2, 1, "--dice-weight", "0.5", "--kl-weight", "1e-3",
                               "--log-every", "1", "--ema-decay", "0")) == 0
    for r in metrics(run / "mask_autoencoder"):
        assert 0 < r["loss_dice"] <= 1
        assert r["loss"] == pytest.approx(r["loss_ce"] + 0.5 * r["loss_dice"] + 1e-3 * r["loss_kl"], rel=1e-5)
    assert train("mask", *args(data, config, tmp_path / "plain", 1, 1, "--ema-decay", "0")) == 0
    assert "loss_dice" not in metrics(tmp_path / "plain" / "mask_autoencoder")[0]  # off by default


@pytest.mark.parametrize("change, match", [
    (dict(dice_weight=-1.0), "dice_weight must be >= 0"),
    (dict(class_balance=-0.5), "class_balance must be >= 0"),
    (dict(unet_steps=0), "unet_steps must be >= 1"),
    (dict(unet_lr=0.0), "unet_lr must be > 0"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
    (dict(scale_factor=-1.0), "scale_factor must be > 0"),
    (dict(context_dropout=1.0), r"context_dropout must be in \[0, 1\)"),
    (dict(tumor_weight=0.5), "tumor_weight must be >= 1"),
    (dict(unet_batch_size=0), "unet_batch_size must be >= 1"),
])
def test_bad_options_are_refused_when_made(change, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        MaskTrainOptions(data="d.json", out=tmp_path, **change)


def test_maps_outside_the_vocabulary_and_bad_flags_are_refused_before_a_run_folder(tmp_path, capsys):
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:5, 2:5, 2:5] = 2  # id 2 is not one of the mask model's 125 classes
    write_volume(tmp_path / "m.nii.gz", lab, affine_from_spacing(30.0), np.uint8)
    data = write_datalist(tmp_path / "datalist.json", [{"image": "m.nii.gz", "label": "m.nii.gz"}])
    out = tmp_path / "run"
    assert train("mask", "--data", str(data), "--out", str(out)) == 2
    assert "ids [2] are not in the mask model's vocabulary" in capsys.readouterr().err and not out.exists()
    assert train("mask", "--data", str(data), "--out", str(out), "--unet-lr", "0") == 2
    assert "--unet-lr must be > 0" in capsys.readouterr().err
    assert train("mask", "--data", str(data), "--out", str(out), "--context-dropout", "1") == 2
    assert "--context-dropout must be in [0, 1)" in capsys.readouterr().err and not out.exists()


def test_the_dice_term_counts_the_classes_present_only():
    target = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    target[0, :4] = 1  # half the volume
    target[0, 6, 6, 6] = 7  # a one-voxel "tumour"
    logits = torch.full((1, 125, 8, 8, 8), -30.0)
    logits[:, 0][target == 0] = logits[:, 1][target == 1] = 30.0
    logits[:, 0][target == 7] = 30.0  # the tumour drawn as background: one of three present classes missed
    assert present_dice(logits, target).item() == pytest.approx(1 / 3, abs=0.01)
    logits[:, 7][target == 7] = 60.0
    assert present_dice(logits, target).item() == pytest.approx(0.0, abs=1e-3)


def test_init_reuses_the_autoencoder_and_starts_a_unet_of_another_architecture_fresh(data, config, tmp_path,
                                                                                        capsys):
    first = tmp_path / "first"
    assert train("mask", *args(data, config, first, 1, 1, "--ema-decay", "0")) == 0
    cfg = json.loads(config.read_text())
    unet = to_dict(mask_preset("mask-tiny").unet) | {"context_embedding": False}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(cfg | {"unet": unet}))
    capsys.readouterr()
    second = tmp_path / "second"
    assert train("mask", *args(data, other, second, 1, 1, "--ema-decay", "0", "--lr", "1e-12", "--init",
                               str(first))) == 0
    assert "the autoencoder starts from it, the UNet starts fresh" in capsys.readouterr().out
    a, b = (load_file(str(r / "mask_autoencoder" / "export" / "model.safetensors")) for r in (first, second))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # one step at lr 1e-12 from the init's autoencoder
    assert "context_embed.0.weight" in load_file(str(first / "mask_unet" / "export" / "model.safetensors"))
    assert "context_embed.0.weight" not in load_file(str(second / "mask_unet" / "export" / "model.safetensors"))

    ae = cfg["autoencoder"] | {"channels": [8, 16]}
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps(cfg | {"autoencoder": ae}))
    assert train("mask", *args(data, wider, tmp_path / "third", 1, 1, "--init", str(first))) == 2
    err = capsys.readouterr().err
    assert str(first) in err and "autoencoder does not have the architecture" in err
    assert not (tmp_path / "third").exists()


def test_a_finished_autoencoder_phase_resumes_under_a_config_that_changes_the_unet_only(data, config, tmp_path,
                                                                                          capsys):
    run = tmp_path / "run"
    assert train("mask", *args(data, config, run, 1, 1, "--ema-decay", "0")) == 0
    ae_file = run / "mask_autoencoder" / "export" / "model.safetensors"
    ae_weights = load_file(str(ae_file))
    cfg = json.loads(config.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps(cfg | {"unet": to_dict(mask_preset("mask-tiny").unet) | {"context_embedding": False}}))
    capsys.readouterr()
    # the autoencoder phase is done and its part of the config is unchanged; the UNet folder holds another UNet
    assert train("mask", *args(data, other, run, 1, 1, "--ema-decay", "0")) == 2
    err = capsys.readouterr().err
    assert str(run / "mask_unet") in err and "remove" in err and "mask_autoencoder" not in err.replace(
        str(run / "mask_unet"), "")
    assert_bitwise_equal(load_file(str(ae_file)), ae_weights)
    shutil.rmtree(run / "mask_unet")
    assert train("mask", *args(data, other, run, 1, 1, "--ema-decay", "0")) == 0
    assert_bitwise_equal(load_file(str(ae_file)), ae_weights)  # not trained again
    assert "context_embed.0.weight" not in load_file(str(run / "mask_unet" / "export" / "model.safetensors"))
    assert load_mask_model(resolve(run)) is not None

    wider = tmp_path / "wider.json"  # another autoencoder: its phase refuses the folder
    wider.write_text(json.dumps(cfg | {"autoencoder": cfg["autoencoder"] | {"channels": [8, 16]}}))
    assert train("mask", *args(data, wider, run, 1, 1)) == 2
    err = capsys.readouterr().err
    assert str(run / "mask_autoencoder") in err and "autoencoder or grid differs" in err
    assert_bitwise_equal(load_file(str(ae_file)), ae_weights)


def test_class_balance_weights_rare_classes_up_in_the_cross_entropy(data, config, tmp_path):
    maps = LabelMaps([e["label"] for e in read_datalist(data)], mask_config(config))
    counts = torch.zeros(NUM_CLASSES)
    for label in maps.labels:
        counts += torch.bincount(to_class_index(torch.from_numpy(label)).ravel(), minlength=NUM_CLASSES)
    present = torch.nonzero(counts).ravel()
    rare, common = present[counts[present].argmin()], present[counts[present].argmax()]
    w = maps.class_weights(0.5)
    assert w[rare] / w[common] == pytest.approx(float((counts[common] / counts[rare]) ** 0.5), rel=1e-4)
    assert (w[counts == 0] == 1).all() and (maps.class_weights(0.0) == 1).all()

    run = tmp_path / "run"
    assert train("mask", *args(data, config, run, 1, 1, "--class-balance", "0.5", "--log-every", "1")) == 0
    plain = tmp_path / "plain"
    assert train("mask", *args(data, config, plain, 1, 1, "--log-every", "1")) == 0
    # same weights, same batch: only the class weighting differs
    assert metrics(run / "mask_autoencoder")[0]["loss_ce"] != pytest.approx(
        metrics(plain / "mask_autoencoder")[0]["loss_ce"], rel=1e-3)


def test_context_dropout_replaces_whole_size_vectors_by_dont_care_per_sample():
    context = torch.rand(400, 10)
    samples = torch.arange(400)
    assert torch.equal(drop_context(context, samples, 0.0, seed=0), context)
    out = drop_context(context, samples, 0.25, seed=0)
    dropped = (out == -1).all(1)
    assert torch.equal(out[~dropped], context[~dropped])  # a vector is dropped whole, or kept whole
    assert 60 < int(dropped.sum()) < 140  # about a quarter
    assert torch.equal(drop_context(context, samples, 0.25, seed=0), out)  # the same samples every run
    assert not torch.equal(drop_context(context, samples, 0.25, seed=1), out)
    # the UNet stage hands the dropped vectors to the network
    stage = MaskDiffusionStage.__new__(MaskDiffusionStage)
    stage.opts, stage.seed = type("O", (), {"context_dropout": 0.25})(), 0
    seen = stage.conditions({"context": context, "sample": samples})["context"]
    assert seen.shape == (400, 1, 10) and torch.equal(seen[:, 0], out)


def test_tumour_weight_counts_the_latent_voxels_over_a_tumour_more():
    maps = LabelMaps.__new__(LabelMaps)
    lab = np.zeros((16, 16, 16), np.uint8)
    lab[:] = 1  # liver
    lab[5, 9, 2] = 26  # one hepatic-tumour voxel: latent block (1, 2, 0) at factor 4
    lab[13, 0, 15] = 24  # pancreatic tumour: block (3, 0, 3)
    maps.labels = [lab, np.ones_like(lab)]
    roi = tumour_latent_voxels(maps, 4)
    assert roi.shape == (2, 1, 4, 4, 4) and roi.sum() == 2
    assert roi[0, 0, 1, 2, 0] == 1 and roi[0, 0, 3, 0, 3] == 1 and roi[1].sum() == 0
    stage = MaskDiffusionStage.__new__(MaskDiffusionStage)
    pred, target = torch.zeros(2, 4, 4, 4, 4), torch.ones(2, 4, 4, 4, 4)
    stage.opts = type("O", (), {"tumor_weight": 1.0})()
    assert stage.loss(pred, target, {"tumor": roi}) == 1.0
    stage.opts.tumor_weight = 100.0
    # two of the 128 latent voxels (×4 channels) weigh 100: mean weight 1 + 99·2/128
    assert stage.loss(pred, target, {"tumor": roi}).item() == pytest.approx(1 + 99 * 2 / 128)


def test_each_phase_has_its_own_run_folder_steps_and_batch(tmp_path):
    o = MaskTrainOptions(data="d.json", out=tmp_path, steps=7, unet_steps=9, batch_size=1, unet_batch_size=4)
    ae, unet = o.loop_options("mask_autoencoder"), o.loop_options("mask_unet")
    assert (ae.run_dir, ae.steps, ae.batch_size) == (tmp_path / "mask_autoencoder", 7, 1)
    assert (unet.run_dir, unet.steps, unet.batch_size) == (tmp_path / "mask_unet", 9, 4)
    assert MaskTrainOptions(data="d.json", out=tmp_path, batch_size=2).loop_options("mask_unet").batch_size == 2
