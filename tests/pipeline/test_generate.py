"""End-to-end generation with tiny random weights: files, affine, masks, determinism, sharding, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from maisi.cli import main
from maisi.io.formats import read_label
from maisi.io.hub import MissingFilesError
from maisi.io.volume import read_volume
from maisi.pipeline import masks as M
from maisi.pipeline.masks import phantom_database
from maisi.pipeline.pipeline import Pipeline, shard
from pipeline_support import RELEASED, make_released_db, req, save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model folder of tiny random networks (autoencoder/, unet/, controlnet/) in the project format."""
    return save_tiny_model(tmp_path_factory.mktemp("model"))[0]


@pytest.fixture(scope="module")
def released_files(tmp_path_factory) -> list[Path]:
    """The same tiny networks as NVIDIA's released .pt files (loaded with config="tiny")."""
    return save_tiny_model(tmp_path_factory.mktemp("released"), released=True)


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


@pytest.mark.parametrize("image_ext, label_ext", [(".nrrd", ".nii"), (".dcm", ".dcm")])
def test_generate_writes_the_output_formats_asked_for(pipe, database, tmp_path, image_ext, label_ext):
    """The NIM's output formats: each file reads back to the same HU, labels and geometry as the sample."""
    r = req(mask_database=str(database), seed=2, spacing=(4.0, 8.0, 10.0), size=(64, 32, 32),
            image_output_ext=image_ext, label_output_ext=label_ext)
    (s,) = pipe.generate(r, out=tmp_path)
    assert s.files["image"].name == f"sample_seed2_image{image_ext}"
    vol, lab = read_volume(s.files["image"]), read_label(s.files["label"])
    np.testing.assert_array_equal(vol.array, s.image)
    np.testing.assert_array_equal(lab.array, s.label)
    np.testing.assert_allclose(vol.affine, s.affine, atol=1e-4)
    np.testing.assert_allclose(lab.affine, s.affine, atol=1e-4)
    rec = json.loads(s.files["record"].read_text())
    assert rec["files"]["label"] == f"sample_seed2_label{label_ext}"


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


@pytest.mark.parametrize("change, match", [
    ({"body_region": ("head_neck",), "tumor": ("hepatic tumor",)}, "no mask in the database shows head_neck with liver"),
    ({"body_region": ("chest",), "anatomy": ("liver", "brain")}, "shows chest with liver, brain"),
])
def test_a_request_no_database_mask_serves_is_refused_at_plan(pipe, database, change, match, monkeypatch):
    monkeypatch.setattr(Pipeline, "mask_for", lambda *a: pytest.fail("planning must refuse it before any mask"))
    with pytest.raises(ValueError, match=match):
        pipe.plan(req(mask_database=str(database), **change))


def test_user_masks_that_cannot_be_followed_are_refused_at_plan(pipe, tmp_path, monkeypatch):
    from maisi.data.phantom import make_phantom
    from maisi.io.volume import write_volume

    monkeypatch.setattr(Pipeline, "mask_for", lambda *a: pytest.fail("planning must refuse it before any mask"))
    ph = make_phantom("head_neck", size=24, spacing=11.0, seed=3)
    write_volume(tmp_path / "head.nii.gz", ph.label, ph.affine, np.uint8)
    with pytest.raises(ValueError, match=r"head.nii.gz has no organ to hold hepatic tumor \(it needs liver\)"):
        pipe.plan(req(body_region=(), mask=str(tmp_path / "head.nii.gz"), tumor=("hepatic tumor",)))
    write_volume(tmp_path / "empty.nii.gz", np.zeros((8, 8, 8), np.uint8), ph.affine, np.uint8)
    with pytest.raises(ValueError, match=r"empty.nii.gz: the label map is empty \(background only\)"):
        pipe.plan(req(body_region=(), mask=str(tmp_path / "empty.nii.gz")))
    (tmp_path / "none.json").write_text('{"foo": "liver"}')  # a mapping that maps none of the map's ids
    with pytest.raises(ValueError, match="empty .* after the mapping .*none.json"):
        pipe.plan(req(body_region=(), mask=str(tmp_path / "head.nii.gz"), mask_mapping=str(tmp_path / "none.json")))


def test_an_empty_body_region_name_is_refused(pipe):
    with pytest.raises(ValueError, match="body region names must be non-empty"):
        pipe.plan(req(body_region=("",)))


def test_a_folder_where_a_sample_file_goes_is_refused_before_compute(model_dir, database, tmp_path, capsys):
    (tmp_path / "g" / "sample_seed3_record.json").mkdir(parents=True)
    args = ["generate", "--weights", str(model_dir), "--size", "32", "--spacing", "8", "--steps", "1", "--seed", "2",
            "--mask-database", str(database), "--no-progress", "--out", str(tmp_path / "g")]
    assert main([*args, "--num-samples", "2"]) == 2
    assert "sample_seed3_record.json is a folder, where the sample's record goes" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["sample_seed3_record.json"]  # nothing written
    assert main([*args, "--num-samples", "1"]) == 0  # seed 2 alone does not need that place


def test_shard_covers_every_sample_once():
    for n, w in [(5, 2), (3, 4), (1, 1)]:
        got = sorted(k for r in range(w) for k in shard(n, r, w))
        assert got == list(range(n))


def test_cli_generate_and_errors(model_dir, database, tmp_path, capsys):
    args = ["generate", "--weights", str(model_dir), "--size", "32", "--spacing", "8", "--steps", "1",
            "--mask-database", str(database), "--no-quality-check", "--no-progress", "--out", str(tmp_path)]
    assert main([*args, "--timesteps", "reference"]) == 0
    assert (tmp_path / "sample_seed0_image.nii.gz").is_file() and (tmp_path / "sample_seed0_preview.png").is_file()
    rec = json.loads((tmp_path / "sample_seed0_record.json").read_text())
    assert rec["resolved"]["timesteps"] == "reference"  # the flag overrides the tiny config's clean schedule
    assert "replacing" not in capsys.readouterr().err
    assert main(args) == 0  # a second run into the same folder says which earlier files it replaces
    assert "warning: replacing 4 file(s) of an earlier run" in capsys.readouterr().err
    assert main([*args, "--seed", "5", "--mask-sampler", "ddpm"]) == 0
    err = capsys.readouterr().err
    assert "replacing" not in err and "warning: --mask-sampler sets the mask generation model" in err
    assert main([*args, "--image-output-ext", ".nrrd"]) == 0  # the .nii.gz image of seed 0 stays beside it
    err = capsys.readouterr().err
    assert "replacing 3 file(s)" in err and "1 file(s) of an earlier run of the same seeds stay" in err
    assert "sample_seed0_image.nii.gz" in err.split("stay")[1]
    assert main([*args, "--size", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main([*args, "--weights", str(tmp_path / "none")]) == 2
    assert "weights not found" in capsys.readouterr().err
    assert main([*args, "--image-output-ext", ".png"]) == 2
    err = capsys.readouterr().err
    assert "--image-output-ext '.png' is not an output format" in err and ".nrrd" in err


@pytest.mark.parametrize("change, flags, fields", [
    ({"mask_source": "none", "anatomy": ("liver",)}, ["--mask, --anatomy and --tumor", "--no-mask"],
     ["mask, anatomy and tumor", "mask_source='none'"]),
    ({"anatomy_size": (("liver", 0.5),)}, ["--anatomy-size: needs a mask generation model", "give --weights with"],
     ["anatomy_size: needs a mask generation model", "give weights with"]),
])
def test_library_errors_name_fields_and_the_cli_names_flags(pipe, model_dir, tmp_path, capsys, change, flags, fields):
    with pytest.raises(ValueError) as e:
        pipe.plan(req(**change))
    assert all(f in str(e.value) for f in fields) and "--" not in str(e.value)  # Python users never typed a flag
    argv = {"mask_source": ["--no-mask"], "anatomy": ["--anatomy", "liver"], "anatomy_size": ["--anatomy-size", "liver=0.5"]}
    args = ["generate", "--weights", str(model_dir), "--size", "32", "--spacing", "8", "--steps", "1",
            "--no-progress", "--out", str(tmp_path)] + [a for k in change for a in argv[k]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in flags) and "mask_source" not in err, err


@pytest.mark.slow
def test_torchrun_two_processes_match_one(model_dir, database, tmp_path):
    """`torchrun --nproc_per_node=2` writes the same samples as one process."""
    common = ["-m", "maisi", "generate", "--weights", str(model_dir), "--size", "32", "--spacing", "8",
              "--steps", "2", "--num-samples", "3", "--mask-database", str(database), "--no-quality-check",
              "--no-progress", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}
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


def test_released_files_default_to_reference_timesteps(released_files, model_dir, pipe, database):
    """NVIDIA's networks sample with NVIDIA's float16 / int() timesteps unless `clean` is asked for; the project's
    models keep their config's choice (tiny: clean)."""
    released = Pipeline.from_pretrained(released_files, config="tiny", device="cpu", progress=False)
    r = req(mask_database=str(database), steps=3, seed=2)
    ref, clean = released.plan(r), released.plan(req(mask_database=str(database), steps=3, seed=2, timesteps="clean"))
    assert (ref.timesteps, clean.timesteps, pipe.plan(r).timesteps) == ("reference", "clean", "clean")
    t_ref, t_clean = released.scheduler(ref).timesteps, released.scheduler(clean).timesteps
    assert t_ref.dtype == torch.float16 and t_clean.dtype == torch.float32
    torch.testing.assert_close(t_ref, t_clean.half(), rtol=0, atol=0)  # the same schedule, stored as the reference does
    assert not torch.equal(t_ref.float(), t_clean)
    (a,), (b,) = released.generate(r), released.generate(replace(r, timesteps="clean"))
    assert a.record["resolved"]["timesteps"] == "reference" and b.record["resolved"]["timesteps"] == "clean"
    assert not np.array_equal(a.image, b.image)  # the schedule reaches the output
    with pytest.raises(ValueError, match="timesteps must be one of"):
        released.plan(replace(r, timesteps="float16"))


def test_released_mask_database_in_generate(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("MAISI_CACHE", str(tmp_path / "cache"))
    index = make_released_db(tmp_path) / f"candidate_masks_{RELEASED}.json"
    (s,) = pipe.generate(req(mask_database=str(index), body_region=("abdomen",), anatomy=("liver",)))
    assert s.record["mask"]["format"] == "released" and s.record["mask"]["file"] == "a/pseudo_label.nii.gz"
    assert s.record["resolved"]["mask_database"] == str(index) and (s.label == 1).any()


def test_hub_mask_database_preferred_for_released_models_only(released_files, pipe, database, tmp_path, monkeypatch):
    """Without --mask-database, NVIDIA's networks take NVIDIA's downloaded masks; the project's models (the demo)
    keep the phantom database; an explicit database or a user mask wins."""
    root = tmp_path / "hub" / "rflow-ct"
    make_released_db(root)
    asked = []

    def local_set(name, *, only=None, **kw):  # the hub cache holds rflow-ct's files only
        asked.append((name, tuple(only or ())))
        if name != "rflow-ct":
            raise MissingFilesError(f"{name} not downloaded")
        return {p: root / p for p in only}

    monkeypatch.setattr(M, "local_set", local_set)
    released = Pipeline.from_pretrained(released_files, config="tiny", device="cpu", progress=False)
    assert released.plan(req()).mask_database == str(root / "datasets" / f"candidate_masks_{RELEASED}.json")
    assert pipe.plan(req()).mask_database is None  # phantoms
    assert released.plan(req(mask_database=str(database))).mask_database == str(database)
    assert released.plan(req(mask_source="none", body_region=())).mask_database is None
    assert asked[0] == ("rflow-ct", (f"datasets/all_masks_{RELEASED}.zip", f"datasets/candidate_masks_{RELEASED}.json"))
    monkeypatch.setattr(M, "local_set", lambda name, **kw: local_set("none", **kw))  # nothing downloaded: phantoms
    assert released.plan(req()).mask_database is None


def test_decode_plan_follows_the_budget_and_is_logged_and_recorded(pipe, database, tmp_path):
    """A budget below the in-memory split's floor streams; the image equals the unsplit decode."""
    from maisi.networks.memory import estimate_peak

    base = req(mask_database=str(database), seed=5, size=(64, 32, 32), quality_check=False)
    (plain,) = pipe.generate(base)
    shape = (1, *pipe.latent_shape(pipe.plan(base)))
    floor = min(estimate_peak(pipe.nets.autoencoder, "decode", shape, k) for k in range(1, 65)) / 1024**3
    lines: list[str] = []
    (streamed,) = pipe.generate(replace(base, memory_gb=floor * 0.9), out=tmp_path, on_event=lines.append)
    assert any(line.startswith("decoder: streaming") for line in lines)
    rec = json.loads(streamed.files["record"].read_text())
    assert rec["model"]["decode_plan"]["kind"] == "streaming"
    assert rec["model"]["decode_plan"]["estimated_gb"] <= floor * 0.9
    assert np.abs(streamed.image.astype(int) - plain.image.astype(int)).max() <= 1  # HU, int16 rounding
    with pytest.raises(ValueError, match="needs at least"):
        pipe.generate(replace(base, memory_gb=1e-6))


def test_on_step_reports_each_sampling_step_and_can_stop_the_job(model_dir, database, tmp_path):
    steps: list[tuple[int, int]] = []
    pipe = Pipeline.from_pretrained(model_dir, device="cpu", progress=False, on_step=lambda *a: steps.append(a))
    pipe.generate(req(mask_database=str(database), steps=3, num_samples=2))
    assert steps == [(1, 3), (2, 3), (3, 3)] * 2  # one sample per batch: each counts its own steps

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        if done == 2:
            raise Stop

    pipe.on_step = stop
    with pytest.raises(Stop):
        pipe.generate(req(mask_database=str(database), steps=3), out=tmp_path / "out")
    assert not list((tmp_path / "out").glob("*_image.nii.gz"))  # stopped between steps: nothing written

