"""End-to-end generation with tiny random weights: files, affine, masks, determinism, sharding, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi.cli import main
from maisi.config import preset
from maisi.io.volume import read_volume
from maisi.pipeline.masks import phantom_database
from maisi.pipeline.pipeline import Pipeline, shard
from maisi.pipeline.validation import GenerationRequest

FAST = dict(size=(32, 32, 32), spacing=(8.0, 8.0, 8.0), steps=1, quality_check=False, body_region=("chest",))


def req(**change) -> GenerationRequest:
    return GenerationRequest(**{**FAST, **change})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model folder of tiny random networks (autoencoder/, unet/, controlnet/) in the project format."""
    from maisi.io.checkpoint import save_pretrained
    from maisi.networks import build

    folder = tmp_path_factory.mktemp("model")
    cfg = preset("tiny")
    torch.manual_seed(0)
    unet = build("unet", cfg)
    save_pretrained(folder / "autoencoder", build("autoencoder", cfg), cfg, "autoencoder")
    save_pretrained(folder / "unet", unet, cfg, "unet", extra={"scale_factor": 1.0})
    from maisi.networks.controlnet import ControlNet

    save_pretrained(folder / "controlnet", ControlNet.from_unet(unet, cfg.controlnet), cfg, "controlnet")
    return folder


@pytest.fixture(scope="module")
def database(tmp_path_factory) -> Path:
    return phantom_database(tmp_path_factory.mktemp("db"), variants=2, size=32, spacing=8.0)


@pytest.fixture(scope="module")
def pipe(model_dir) -> Pipeline:
    return Pipeline.from_pretrained(model_dir, device="cpu", progress=False)


def test_generate_writes_volume_label_preview_record(pipe, database, tmp_path):
    r = req(mask_database=str(database), anatomy=("liver",), body_region=("abdomen",), seed=7, size=(64, 32, 32),
            spacing=(4.0, 8.0, 10.0))
    (s,) = pipe.generate(r, out=tmp_path)
    assert s.seed == 7 and s.image.dtype == np.int16 and s.image.shape == (64, 32, 32)
    vol, lab = read_volume(s.files["image"]), read_volume(s.files["label"])
    np.testing.assert_allclose(vol.spacing, (4.0, 8.0, 10.0))
    np.testing.assert_allclose(vol.affine, lab.affine)
    assert vol.array.min() >= -1000 and vol.array.max() <= 1000
    assert np.all(vol.array[lab.array == 0] == -1000)  # air outside the body
    assert (lab.array == 1).any()  # the requested liver is in the mask
    rec = json.loads(s.files["record"].read_text())
    assert rec["seed"] == 7 and rec["request"]["anatomy"] == ["liver"] and rec["resolved"]["body_region"] == [2, 2]
    assert len(rec["model"]["weights"]["unet"]["sha256"]) == 64 and rec["mask"]["kind"] == "database"
    assert s.files["preview"].stat().st_size > 1000 and rec["environment"]["maisi"]


def test_same_seed_same_volume_whatever_batch_or_process(pipe, database):
    one_by_one = pipe.generate(req(mask_database=str(database), num_samples=2, seed=11))
    batched = pipe.generate(req(mask_database=str(database), num_samples=2, seed=11, batch_size=2))
    rank1 = pipe.generate(req(mask_database=str(database), num_samples=2, seed=11), rank=1, world_size=2)
    assert [s.index for s in rank1] == [1] and [s.seed for s in one_by_one] == [11, 12]
    np.testing.assert_array_equal(one_by_one[1].image, rank1[0].image)
    for a, b in zip(one_by_one, batched):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1  # batched convs: float rounding only
    assert not np.array_equal(one_by_one[0].image, one_by_one[1].image)


def test_image_only_and_user_mask(pipe, database, tmp_path):
    (s,) = pipe.generate(req(body_region=(), mask_source="none"))
    assert s.label is None and s.record["mask"] is None
    from maisi.data.phantom import make_phantom
    from maisi.io.volume import write_volume

    ph = make_phantom("chest", size=24, spacing=11.0, seed=3)
    no_body = np.where(ph.label == 200, 0, ph.label).astype(np.uint8)
    write_volume(tmp_path / "mask.nii.gz", no_body, ph.affine, np.uint8)
    (s,) = pipe.generate(req(body_region=(), mask=str(tmp_path / "mask.nii.gz")))
    assert s.record["mask"]["body_added"] and (s.label == 200).any()
    assert set(np.unique(s.label)) - {200} <= set(np.unique(ph.label))
    assert s.record["resolved"]["body_region"] == [1, 1]  # derived from the mask's lungs


def test_tumour_inpainted_into_host(pipe, database):
    (s,) = pipe.generate(req(body_region=("abdomen",), mask_database=str(database), tumor=("hepatic tumor",)))
    assert (s.label == 26).any() and s.record["mask"]["tumors"] == [26]


@pytest.mark.parametrize("change, match", [
    ({"size": (48, 64, 64)}, "multiple of 32"),
    ({"sampler": "ddpm"}, "trained with rflow"),
    ({"anatomy": ("livr",)}, "did you mean 'liver'"),
    ({"mask_source": "none", "anatomy": ("liver",)}, "need a mask"),
    ({"mask": "/nonexistent/mask.nii.gz"}, "mask not found"),
])
def test_plan_errors_before_compute(pipe, change, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        pipe.plan(req(**change))


def test_shard_covers_every_sample_once():
    for n, w in [(5, 2), (3, 4), (1, 1)]:
        got = sorted(k for r in range(w) for k in shard(n, r, w))
        assert got == list(range(n))


def test_cli_generate_and_errors(model_dir, database, tmp_path, capsys):
    args = ["generate", "--weights", str(model_dir), "--size", "32", "--spacing", "8", "--steps", "1",
            "--mask-database", str(database), "--no-quality-check", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    assert (tmp_path / "sample_seed0_image.nii.gz").is_file() and (tmp_path / "sample_seed0_preview.png").is_file()
    assert main([*args, "--size", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main([*args, "--weights", str(tmp_path / "none")]) == 2
    assert "weights not found" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_match_one(model_dir, database, tmp_path):
    """`torchrun --nproc_per_node=2` writes the same samples as one process."""
    common = ["-m", "maisi", "generate", "--weights", str(model_dir), "--size", "32", "--spacing", "8",
              "--steps", "2", "--num-samples", "3", "--mask-database", str(database), "--no-quality-check",
              "--no-progress", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    *common, "--out", str(tmp_path / "two")], check=True, env=env)
    for seed in range(3):
        a = read_volume(tmp_path / "one" / f"sample_seed{seed}_image.nii.gz").array
        b = read_volume(tmp_path / "two" / f"sample_seed{seed}_image.nii.gz").array
        np.testing.assert_array_equal(a, b)


def test_anatomy_without_region_searches_every_region(pipe, database):
    (s,) = pipe.generate(req(body_region=(), mask_database=str(database), anatomy=("brain",)))
    assert (s.label == 22).any() and s.record["resolved"]["body_region"] == [0, 0]


def test_failed_quality_check_retries_with_another_mask(pipe, database, monkeypatch):
    import maisi.pipeline.pipeline as P

    verdicts = iter([False, True])
    monkeypatch.setattr(P, "check_quality", lambda hu, label: {"passed": next(verdicts), "organs": {}})
    (s,) = pipe.generate(req(mask_database=str(database), quality_check=True, quality_retries=2))
    a = s.record["attempts"]
    assert [x["quality_passed"] for x in a] == [False, True] and s.record["quality"]["passed"] is True
    assert a[0]["mask"]["file"] != a[1]["mask"]["file"] and a[1]["mask"]["rank"] == 1


@pytest.mark.slow
def test_demo_runs_the_whole_story(tmp_path):
    """`maisi demo`: phantoms → VAE → latents → UNet → ControlNet → a generated sample with its preview."""
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--no-progress"]) == 0
    for comp in ("autoencoder", "unet", "controlnet"):
        assert (tmp_path / "model" / comp / "model.safetensors").is_file()
    rec = json.loads((tmp_path / "generated" / "sample_seed0_record.json").read_text())
    assert rec["model"]["weights"]["controlnet"]["path"].startswith(str(tmp_path))
    assert (tmp_path / "generated" / "sample_seed0_preview.png").is_file()


def test_bf16_generation_is_close_to_fp32_and_recorded(model_dir, database, pipe):
    r = req(mask_database=str(database), seed=3)
    bf16 = Pipeline.from_pretrained(model_dir, device="cpu", progress=False, precision="bf16")
    assert bf16.nets.unet.conv_in.conv.weight.dtype == torch.bfloat16
    (a,), (b,) = pipe.generate(r), bf16.generate(r)
    assert a.record["model"]["precision"] == "fp32" and b.record["model"]["precision"] == "bf16"
    diff = np.abs(a.image.astype(np.float32) - b.image.astype(np.float32))
    body = a.label > 0
    assert diff.max() > 0  # the bf16 path really ran
    assert diff[body].mean() < 20.0  # HU; random tiny weights, one step
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        Pipeline.from_pretrained(model_dir, device="cpu", progress=False, precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        Pipeline.from_pretrained(model_dir, device="cpu", progress=False, precision="int8")
