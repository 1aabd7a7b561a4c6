"""The phantom segmenter behind `evaluate consistency`: inputs, resampling, file format, and that it learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import maisi.evaluation.segmenter as segmenter_module
from maisi.data.phantom import make_phantom
from maisi.evaluation.metrics import dice_per_label
from maisi.evaluation.segmenter import (
    WINDOWS,
    Degradation,
    PhantomSegmenter,
    _channels,
    _legacy_net,
    _net,
    image_augmentation,
    load_segmenter,
    save_segmenter,
    train_phantom_segmenter,
)


class _HUThreshold(torch.nn.Module):
    """Logits from the wide-window channel: class 1 (→ label id 7) where HU > −500 (the body), else background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x[:, :1] > 0.25).float()
        return torch.cat([1 - fg, fg], 1)


def test_inputs_window_soft_tissue():
    hu = torch.tensor([-1000.0, 0.0, 88.0, 98.0, 108.0, 165.0, 1000.0])  # air, water, pancreas, liver, spleen, kidney
    x = _channels(hu)
    assert x.shape == (len(WINDOWS), 7) and x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x[0, [0, 1, 6]], torch.tensor([0.0, 0.5, 1.0]))  # the wide window: air 0, bone 1
    # organs ten HU apart are resolved (> 0.02) by some channel, not only ~0.005 as in the wide window alone
    assert (x[:, 3] - x[:, 2]).abs().max() > 0.02 and (x[:, 4] - x[:, 3]).abs().max() > 0.02


@pytest.mark.parametrize("shape,spacing", [((64, 72, 56), 4.0), ((40, 48, 36), 5.0), ((24, 32, 20), 6.0)])
def test_resampling_to_training_spacing_keeps_alignment(shape, spacing):
    # A fixed network (HU > −500 → id 7) at a 6 mm training spacing, called on volumes at other spacings: the
    # prediction comes back on the input grid, aligned with the ground truth (no axis swap, flip or shift).
    # The object is an off-centre box, 60–84 mm a side, so that a flip or swap of any axis moves it.
    seg = PhantomSegmenter(_HUThreshold(), (7,), (6.0, 6.0, 6.0))
    hu = np.full(shape, -1000.0, np.float32)
    lo = [round(f * n) for f, n in zip((0.1, 0.15, 0.2), shape)]
    hi = [a + round(mm / spacing) for a, mm in zip(lo, (72.0, 60.0, 84.0))]
    hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 300.0
    pred = seg(torch.from_numpy(hu), spacing=(spacing,) * 3)
    assert tuple(pred.shape) == shape
    assert dice_per_label(pred, np.where(hu > -500, 7, 0), [7])[7] > 0.9


def test_saved_segmenter_keeps_windows_and_reloads(tmp_path):
    seg = PhantomSegmenter(_net(3), (1, 22), (6.0, 6.0, 6.0), {"steps": 0})
    path = save_segmenter(seg, tmp_path / "s.safetensors")
    again = load_segmenter(path)
    assert again.windows == seg.windows == tuple(tuple(w) for w in WINDOWS) and again.labels == (1, 22)
    hu = torch.from_numpy(make_phantom("chest", size=32, spacing=6.0, seed=3).image)
    assert torch.equal(again(hu, spacing=(6, 6, 6)), seg(hu, spacing=(6, 6, 6)))


def test_legacy_segmenter_file_still_loads(tmp_path):
    # files of the first version: a one-channel BasicUNet on [-1000, 1000] HU, no "network"/"windows" metadata
    labels = [1, 22]
    path = tmp_path / "old.safetensors"
    meta = {"kind": "maisi-phantom-segmenter", "labels": json.dumps(labels), "spacing": json.dumps([6.0] * 3),
            "features": json.dumps([8, 16, 32, 32, 64, 8]), "info": "{}"}
    save_file({k: v.contiguous() for k, v in _legacy_net(3).state_dict().items()}, str(path), metadata=meta)
    seg = load_segmenter(path)
    assert seg.windows == ((-1000.0, 1000.0),)
    assert seg(torch.zeros(32, 32, 16), spacing=(6, 6, 6)).shape == (32, 32, 16)


def _heldout_dice(seg, labels):
    """Mean Dice over `labels` on held-out phantoms at another size and spacing (256 mm field of view) than the
    training crops (192 mm): the network must know the organs' look, not where a training field of view puts them."""
    per = {}
    for region, seed in (("chest", 90000), ("abdomen", 90001), ("head_neck", 90003), ("chest-abdomen", 90004)):
        p = make_phantom(region, size=64, spacing=4.0, seed=seed)
        pred = seg(torch.from_numpy(p.image), spacing=p.spacing)
        ids = [v for v in labels if (p.label == v).any()]
        for k, v in dice_per_label(pred, p.label, ids).items():
            per.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in per.items()}


@pytest.mark.slow
def test_tiny_training_segments_held_out_phantoms(tmp_path):
    # liver, brain, left upper lung lobe, right upper lung lobe, heart, skull: a short CPU run (~90 s) must find them
    labels = (1, 22, 28, 30, 115, 120)
    torch.set_num_threads(1)
    seg = train_phantom_segmenter(tmp_path / "s.safetensors", steps=400, size=(32, 32, 32), spacing=(6, 6, 6),
                                  n_phantoms=8, labels=labels, log=None)
    dice = _heldout_dice(seg, labels)
    assert set(dice) == set(labels)
    assert np.mean(list(dice.values())) > 0.4, dice  # the first version: ~0.1


def test_training_leaves_out_spans_that_do_not_fit(tmp_path):
    # 16³ crops at 4 mm with context 1.5: a 96 mm field of view shows chest-abdomen (35 mm needed) but not
    # head_neck-chest (170 mm) or abdomen-pelvis (215 mm), which make_phantom would refuse
    seg = train_phantom_segmenter(tmp_path / "s.safetensors", steps=1, size=(16, 16, 16), n_phantoms=2, batch=1)
    assert seg.info["regions"] == ["head_neck", "chest", "abdomen", "pelvis", "chest-abdomen"]
    assert load_segmenter(tmp_path / "s.safetensors").info["regions"] == seg.info["regions"]
    with pytest.raises(ValueError, match="no training region fits a 96 mm field of view"):
        train_phantom_segmenter(tmp_path / "x.safetensors", steps=1, size=(16, 16, 16), regions=("abdomen-pelvis",))


def _flat_with_cube() -> np.ndarray:
    """A flat 40 HU field holding a 300 HU cube: the corner shows noise and calibration, the cube's edge blur."""
    hu = np.full((1, 32, 32, 32), 40.0, np.float32)
    hu[:, 12:24, 12:24, 12:24] = 300.0
    return hu


def _draws(degradation: Degradation, n: int = 30, seed: int = 1) -> list[np.ndarray]:
    aug = image_augmentation(seed, degradation)
    return [np.asarray(aug(torch.from_numpy(_flat_with_cube())))[0] for _ in range(n)]


def _edge(d: np.ndarray) -> float:
    return float(np.abs(np.diff(d, axis=0)).max())


def test_blur_and_coarser_grids_soften_edges_but_keep_flat_regions_flat():
    hu = _flat_with_cube()[0]
    for degradation in (Degradation(0, 1, 0, 0, 0), Degradation(1, 0, 0, 0, 0)):
        draws = _draws(degradation)
        assert max(_edge(d) for d in draws) <= 260 + 1e-3 and min(_edge(d) for d in draws) < 0.8 * 260
        # no dark or bright rim where the crop ends (MONAI's blur alone pads with 0 HU: the corner fell to ~31 HU)
        assert all(np.abs(d[:6, :6, :6] - 40).max() < 0.05 for d in draws)
        if degradation.blur:  # a blur moves no intensity in or out of the crop
            assert all(abs(float(d.mean()) - float(hu.mean())) < 0.05 for d in draws)


def test_noise_gain_and_offset_stay_within_their_ranges():
    noisy = [d[:6, :6, :6].std() for d in _draws(Degradation(0, 0, 1, 0, 0))]
    assert max(noisy) < 22 and sum(s > 2 for s in noisy) > 20  # σ drawn up to 20 HU
    for degradation, bound in ((Degradation(0, 0, 0, 1, 0), 0.05 * 40), (Degradation(0, 0, 0, 0, 1), 25)):
        moved = [float(d[:6, :6, :6].mean()) - 40 for d in _draws(degradation)]
        assert max(abs(m) for m in moved) <= bound + 1e-3 and len({round(m, 3) for m in moved}) > 20


def test_augmentation_leaves_some_crops_alone_and_repeats_with_its_seed():
    hu = _flat_with_cube()[0]
    draws = _draws(Degradation(), n=60)
    assert 3 <= sum(np.array_equal(d, hu) for d in draws) <= 30  # all five skipped: p ≈ 0.18
    assert all(np.array_equal(a, b) for a, b in zip(draws, _draws(Degradation(), n=60)))
    assert not all(np.array_equal(a, b) for a, b in zip(draws, _draws(Degradation(), n=60, seed=2)))


@pytest.mark.parametrize("augment", [True, False])
def test_training_degrades_crops_only_when_asked(tmp_path, monkeypatch, augment):
    calls = []

    def recording(seed):
        def degrade(hu):
            calls.append(tuple(hu.shape))
            return hu
        return degrade

    monkeypatch.setattr(segmenter_module, "image_augmentation", recording)
    seg = train_phantom_segmenter(tmp_path / "s.safetensors", steps=2, size=(16, 16, 16), n_phantoms=2, batch=2,
                                  augment=augment)
    assert calls == ([(1, 16, 16, 16)] * 4 if augment else [])  # each HU crop, before windowing
    assert seg.info["augment"] is augment


def test_segmenter_widths_are_saved_and_reloaded(tmp_path):
    seg = train_phantom_segmenter(tmp_path / "s.safetensors", steps=1, size=(16, 16, 16), n_phantoms=1, batch=1,
                                  channels=(8, 16, 24, 40))
    again = load_segmenter(tmp_path / "s.safetensors")
    assert tuple(again.net.channels) == (8, 16, 24, 40) and again.info["channels"] == [8, 16, 24, 40]
    hu = torch.from_numpy(make_phantom("chest", size=32, spacing=6.0, seed=3).image)
    assert torch.equal(again(hu, spacing=(6, 6, 6)), seg(hu, spacing=(6, 6, 6)))
    with pytest.raises(ValueError, match="channels must be 4 positive widths"):
        train_phantom_segmenter(tmp_path / "x.safetensors", steps=1, size=(16, 16, 16), channels=(8, 16, 32))


@pytest.mark.parametrize("network", [{"name": "UNet", "channels": [8, 16, 32], "strides": [2, 2, 2],
                                      "num_res_units": 1},
                                     {"name": "UNet", "channels": [8, 16, 32, "64"], "strides": [2, 2, 2],
                                      "num_res_units": 1},
                                     {"name": "UNet", "channels": [8, 16, 32, 64], "strides": [2, 2, 1],
                                      "num_res_units": 1}])
def test_a_segmenter_file_with_another_network_is_refused(tmp_path, network):
    path = tmp_path / "odd.safetensors"
    meta = {"kind": "maisi-phantom-segmenter", "labels": json.dumps([1]), "spacing": json.dumps([6.0] * 3),
            "network": json.dumps(network), "windows": json.dumps([list(w) for w in WINDOWS]), "info": "{}"}
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match="is not a MONAI UNet with strides"):
        load_segmenter(path)
