"""`maisi generate --anatomy-size`: a new mask from the mask model, handed to the ControlNet; the record holds the
requested, completed and measured sizes; every bad request is refused before any compute."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi.cli import main
from maisi.io.checkpoint import save_pretrained
from maisi.io.volume import affine_from_spacing, write_volume
from maisi.maskgen import AnatomySizeError, build_mask_autoencoder, build_mask_unet, mask_preset
from maisi.maskgen.context import CONDITIONS_FILE, complete_context, load_condition_table
from maisi.maskgen.sizes import conditions_entries, measure_sizes, percentile_sizes, structure_volumes
from maisi.pipeline import pipeline as P
from maisi.pipeline.pipeline import Pipeline
from pipeline_support import req, save_tiny_model

SIZES = (("liver", 0.7), ("pancreatic tumor", 0.3))
FAST_MASK = dict(mask_steps=3, body_region=())  # the region comes from the generated mask


def save_tiny_mask_model(folder: Path) -> None:
    """mask-tiny networks on a 32³ grid at 12 mm with random weights (zero-initialised layers randomised too) as
    mask_autoencoder/ and mask_unet/ maisi checkpoints, and a two-row conditions file in the model folder."""
    cfg = replace(mask_preset("mask-tiny"), latent_shape=(4, 8, 8, 8), spacing_mm=12.0)
    torch.manual_seed(1)
    ae, unet = build_mask_autoencoder(cfg), build_mask_unet(cfg)
    with torch.no_grad():
        for net in (ae, unet):
            for p in net.parameters():
                if not p.any():
                    torch.nn.init.normal_(p, std=0.05)
    save_pretrained(folder / "mask_autoencoder", ae, cfg, "mask_autoencoder")
    save_pretrained(folder / "mask_unet", unet, cfg, "mask_unet", extra={"scale_factor": 1.0})
    rows = [[0.5] * 10, [0.2] * 5 + [-1.0] * 5]
    (folder / CONDITIONS_FILE).write_text(json.dumps([{"organ_size": r} for r in rows]))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny main model with a mask model beside it, and the same main model without one."""
    with_mask, without = tmp_path_factory.mktemp("with_mask"), tmp_path_factory.mktemp("without_mask")
    save_tiny_model(with_mask)
    save_tiny_mask_model(with_mask)
    save_tiny_model(without)
    return {"with": with_mask, "without": without}


@pytest.fixture(scope="module")
def pipe(folders) -> Pipeline:
    return Pipeline.from_pretrained(folders["with"], device="cpu", progress=False)


def test_generate_with_anatomy_size_records_requested_completed_and_measured(pipe, tmp_path):
    sample = pipe.generate(req(anatomy_size=SIZES, **FAST_MASK), out=tmp_path)[0]
    rec = json.loads(sample.files["record"].read_text())
    sizes = rec["mask"]["anatomy_size"]
    assert sizes["requested"] == {"liver": 0.7, "pancreatic tumor": 0.3}
    # the nearest row (L1 over liver and pancreatic tumour) is [0.5]*10; the requested slots are written over it
    assert sizes["completed"] == [0.5, 0.7, 0.5, 0.5, 0.5, 0.5, 0.3, 0.5, 0.5, 0.5]
    assert rec["resolved"]["anatomy_size"]["completed"] == sizes["completed"]
    assert rec["mask"]["kind"] == "generated" and rec["request"]["anatomy_size"] == [["liver", 0.7],
                                                                                   ["pancreatic tumor", 0.3]]
    measured = sizes["measured"]
    assert len(measured) == 10 and all(m["size"] is None for m in measured.values())  # the file has no volumes
    # the measured volumes are those of the generated (post-processed) 32³ map at 12 mm, before the crop to 8 mm
    assert sample.label.shape == (32, 32, 32) and sample.image.shape == (32, 32, 32)
    assert sum(m["volume_ml"] for m in measured.values()) > 0


def test_generated_mask_is_the_controlnets_condition(pipe, monkeypatch):
    seen = []
    real = Pipeline.sample_latents

    def spy(self, plan, seeds, masks, regions, desc=""):
        seen.extend(m.label.copy() for m in masks)
        return real(self, plan, seeds, masks, regions, desc)

    monkeypatch.setattr(Pipeline, "sample_latents", spy)
    sample = pipe.generate(req(anatomy_size=SIZES, **FAST_MASK))[0]
    assert len(seen) == 1 and np.array_equal(seen[0], sample.label) and sample.label.any()


@pytest.mark.parametrize("change, field, match", [
    (dict(anatomy_size=(("livr", 0.5),)), "livr", "unknown structure .*did you mean 'liver'"),
    (dict(anatomy_size=(("liver", 1.5),)), "liver", r"must be in \[0, 1\] or -1"),
    (dict(anatomy_size=(("lung tumor", 0.2), ("bone lesion", 0.4))), "bone lesion", "at most one tumour"),
    (dict(anatomy_size=tuple((n, 0.5) for n in ["liver"] * 11)), "anatomy_size", "at most 10 entries"),
    (dict(anatomy_size=SIZES, tumor=("hepatic tumor",)), "anatomy_size", "cannot be combined with"),
    (dict(anatomy_size=SIZES, mask_steps=0), None, "mask_steps must be in"),
    (dict(anatomy_size=SIZES, mask_guidance=-1.0), None, r"mask_guidance must be in 0..20 \(0: no guidance\)"),
])
def test_bad_requests_are_refused_before_compute(pipe, monkeypatch, change, field, match):
    monkeypatch.setattr(P, "generate_mask", lambda *a, **k: pytest.fail("a mask was generated"))
    monkeypatch.setattr(Pipeline, "sample_latents", lambda *a, **k: pytest.fail("sampling started"))
    with pytest.raises(ValueError, match=match) as info:
        pipe.generate(req(**{**FAST_MASK, **change}))
    if field is not None:
        assert isinstance(info.value, AnatomySizeError) and info.value.field == field


def test_no_mask_model_or_no_conditions_is_refused_with_what_is_needed(folders, tmp_path, capsys):
    plain = Pipeline.from_pretrained(folders["without"], device="cpu", progress=False)
    with pytest.raises(AnatomySizeError, match="needs a mask generation model.*mask_autoencoder/ and mask_unet/"):
        plain.plan(req(anatomy_size=SIZES))
    args = ["generate", "--size", "32", "--spacing", "8", "--steps", "1", "--no-progress", "--out", str(tmp_path)]
    assert main([*args, "--weights", str(folders["without"]), "--anatomy-size", "liver=0.7"]) == 2
    assert "--anatomy-size: needs a mask generation model" in capsys.readouterr().err
    assert main([*args, "--weights", str(folders["with"]), "--anatomy-size", "liver=big"]) == 2
    assert "the size must be a number" in capsys.readouterr().err
    assert main([*args, "--weights", str(folders["with"]), "--anatomy-size", "liver=0.2", "gallbladder=2"]) == 2
    assert "--anatomy-size['gallbladder']: size must be in [0, 1]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_generate_with_anatomy_size(folders, tmp_path):
    args = ["generate", "--weights", str(folders["with"]), "--size", "32", "--spacing", "8", "--steps", "1",
            "--no-progress", "--no-quality-check", "--out", str(tmp_path), "--anatomy-size", "liver=0.7",
            "pancreatic tumour=0.3", "--mask-sampler", "rflow", "--mask-steps", "2"]
    assert main(args) == 0
    rec = json.loads(next(tmp_path.glob("*_record.json")).read_text())
    assert rec["mask"]["anatomy_size"]["requested"] == {"liver": 0.7, "pancreatic tumor": 0.3}
    assert rec["mask"]["steps"] == 2 and (tmp_path / "sample_seed0_label.nii.gz").is_file()
    assert rec["mask"]["guidance"] == 0.0  # the model's: none


def test_mask_guidance_reaches_the_mask_sampler_and_the_record(folders, pipe, monkeypatch, tmp_path, capsys):
    seen = []
    real = P.generate_mask
    monkeypatch.setattr(P, "generate_mask", lambda *a, **k: seen.append(k["guidance"]) or real(*a, **k))
    sample = pipe.generate(req(anatomy_size=SIZES, mask_guidance=2.5, **FAST_MASK))[0]
    assert seen == [2.5] and sample.record["mask"]["guidance"] == 2.5
    args = ["generate", "--weights", str(folders["with"]), "--size", "32", "--spacing", "8", "--steps", "1",
            "--no-progress", "--out", str(tmp_path), "--anatomy-size", "liver=0.7", "--mask-steps", "2"]
    assert main([*args, "--mask-guidance", "25"]) == 2
    assert "--mask-guidance must be in 0..20" in capsys.readouterr().err and not any(tmp_path.iterdir())
    assert main([*args, "--mask-sampler", "ddpm"]) == 2
    assert ("--mask-sampler must be 'rflow' for a mask UNet trained with rflow, got 'ddpm'"
            in capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# Sizes and the conditions file
# ---------------------------------------------------------------------------------------------


def hand_made_maps() -> list[np.ndarray]:
    """Three 10³ maps: livers of 8, 27 and 64 voxels, a gallbladder in two of them, a hepatic tumour in one."""
    maps = []
    for k, edge in enumerate((2, 3, 4)):
        m = np.zeros((10, 10, 10), np.uint8)
        m[:edge, :edge, :edge] = 1
        if k:
            m[6:8, 6:8, 6:8] = 10
        if k == 2:
            m[9, 9, 9] = 26
        maps.append(m)
    return maps


def test_sizes_are_volume_percentiles_and_absent_structures_are_dont_care():
    volumes = np.stack([structure_volumes(m, (2.0, 2.0, 2.0)) for m in hand_made_maps()])
    assert volumes[:, 1].tolist() == [8 * 8 / 1000, 27 * 8 / 1000, 64 * 8 / 1000]  # liver, mL at 8 mm³ a voxel
    sizes = percentile_sizes(volumes)
    assert sizes[:, 1] == pytest.approx([1 / 6, 3 / 6, 5 / 6])  # mid-rank: (below + half the ties) / n
    assert sizes[:, 0].tolist() == [-1.0, 0.5, 0.5]  # gallbladder: absent, then two equal volumes
    assert sizes[:, 7].tolist() == [-1.0, -1.0, 0.5]  # hepatic tumour in one map only
    measured = measure_sizes(hand_made_maps()[1], (2.0, 2.0, 2.0), volumes)
    assert measured["liver"] == {"volume_ml": 0.216, "size": 0.5}


def test_prepare_writes_a_conditions_file_in_the_released_layout(tmp_path):
    for k, m in enumerate(hand_made_maps()):
        write_volume(tmp_path / "maps" / f"case{k}.nii.gz", m, affine_from_spacing(2.0), np.uint8)
    assert main(["prepare", "--anatomy-conditions", "--input", str(tmp_path / "maps"), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / CONDITIONS_FILE).read_text())
    assert [e["label"] for e in data] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert data == conditions_entries(np.stack([structure_volumes(m, (2.0,) * 3) for m in hand_made_maps()]),
                                      [e["label"] for e in data])
    sizes, volumes = load_condition_table(tmp_path / CONDITIONS_FILE)
    assert sizes.shape == (3, 10) and volumes.shape == (3, 10)
    assert complete_context({"liver": 0.9}, sizes)[1] == 0.9 and complete_context({"liver": 0.9}, sizes)[0] == 0.5
