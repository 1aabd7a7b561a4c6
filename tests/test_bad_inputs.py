"""A corpus of bad inputs fed to every entry point in-process: each is refused with exit 2, a message that names
the file, no traceback, no partial output and no code run; plus umask-respecting writes and foreign label ids.
docs/inputs.md lists these checks; keep the two in step."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from maisi import networks
from maisi.cli import main
from maisi.config import preset
from maisi.data.phantom import make_phantom, write_phantom
from maisi.data.prepare import LabelIdsWarning, PrepareConfig, prepare_all
from maisi.evaluation.metrics import ms_ssim
from maisi.io import checkpoint as ckpt
from maisi.io.atomic import atomic_write_text
from maisi.io.volume import affine_from_spacing, read_volume, write_volume
from maisi.networks import build
from maisi.networks.controlnet import ControlNet
from maisi.pipeline.models import Networks
from maisi.pipeline.pipeline import Pipeline
from maisi.pipeline.validation import GenerationRequest
from train_support import latent_datalist

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 16, 16)
AFFINE = affine_from_spacing(12.0, SHAPE)
TINY = preset("tiny")


def _nan(path: Path) -> None:
    a = np.full(SHAPE, -1000.0, np.float32)
    a[3, 4, 5] = np.nan
    write_volume(path, a, AFFINE)


def _inf(path: Path) -> None:
    a = np.full(SHAPE, -1000.0, np.float32)
    a[8, 8, 8] = np.inf
    write_volume(path, a, AFFINE)


def _no_geometry(path: Path) -> None:
    """pixdim 0 and qform_code = sform_code = 0: nibabel would read it as 1 mm with a guessed orientation."""
    img = nib.Nifti1Image(np.zeros(SHAPE, np.int16), None)
    img.header["pixdim"][1:4] = 0
    nib.save(img, str(path))


def _no_orientation(path: Path) -> None:
    """A valid voxel size, but qform_code = sform_code = 0: the orientation would be guessed."""
    img = nib.Nifti1Image(np.zeros(SHAPE, np.int16), None)
    img.header.set_zooms((12.0, 12.0, 12.0))
    nib.save(img, str(path))


def _negative_pixdim(path: Path) -> None:
    img = nib.Nifti1Image(np.zeros(SHAPE, np.int16), AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=1)
    img.header["pixdim"][1] = -12.0
    nib.save(img, str(path))


BAD_VOLUMES = {"nan": (_nan, "NaN or infinite"), "inf": (_inf, "NaN or infinite"),
               "no_geometry": (_no_geometry, "pixdim"), "no_orientation": (_no_orientation, "no orientation"),
               "negative_pixdim": (_negative_pixdim, "pixdim")}


def _refused(capsys, rc: int, names: Path | str, absent: Path | None = None, rule: str | None = None) -> str:
    """The shared assertions: exit 2, the file and rule named, no traceback, nothing written at `absent`."""
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == 2, text
    assert str(names) in out.err, out.err
    if rule:
        assert rule in out.err, out.err
    assert "Traceback" not in text
    if absent is not None:
        assert not absent.exists(), f"{absent} was created"
    return out.err


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """Two small abdomen phantoms (image + MAISI label map)."""
    root = tmp_path_factory.mktemp("good")
    for s in (0, 1):
        write_phantom(make_phantom("abdomen", SHAPE, 12.0, seed=s), root, f"p{s}")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae") / "vae"
    ckpt.save_pretrained(folder, build("autoencoder", TINY), TINY, "autoencoder")
    return folder


def _bad_set(tmp_path: Path, good: Path, kind: str) -> tuple[Path, Path]:
    """A folder holding one good image and one bad one; returns (folder, bad file)."""
    folder = tmp_path / f"set_{kind}"
    folder.mkdir()
    (folder / "p0_image.nii.gz").write_bytes((good / "p0_image.nii.gz").read_bytes())
    bad = folder / "bad_image.nii.gz"
    BAD_VOLUMES[kind][0](bad)
    return folder, bad


# ---------------------------------------------------------------------------------------------
# Bad volumes: NaN, inf, no geometry, negative pixdim — at every entry point that reads volumes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BAD_VOLUMES))
def test_read_volume_refuses_bad_volumes(tmp_path, kind):
    make, rule = BAD_VOLUMES[kind]
    make(tmp_path / "v.nii.gz")
    with pytest.raises(ValueError, match=rule) as err:
        read_volume(tmp_path / "v.nii.gz")
    assert str(tmp_path / "v.nii.gz") in str(err.value)


TRAIN_VAE = ["--config", "tiny", "--steps", "1", "--patch", "16", "--perceptual-weight", "0", "--disc-layers", "1",
             "--device", "cpu", "--no-progress", "--no-tensorboard"]


def _datalist(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"training": [{k: str(v) for k, v in e.items()} for e in entries]}))
    return path


@pytest.mark.parametrize("kind", list(BAD_VOLUMES))
@pytest.mark.parametrize("entry", ["prepare", "fid", "diversity", "reconstruction", "quality", "consistency",
                                   "generate --mask", "train vae"])
def test_bad_volume_refused_at_every_entry_point(tmp_path, capsys, good, tiny_vae, kind, entry):
    folder, bad = _bad_set(tmp_path, good, kind)
    out = tmp_path / "out"
    labels = tmp_path / "labels"
    labels.mkdir()
    for n in ("p0", "bad"):  # a good label map for each image
        (labels / f"{n}_label.nii.gz").write_bytes((good / "p0_label.nii.gz").read_bytes())
    datalist = _datalist(tmp_path / "train.json", [{"image": p} for p in sorted(folder.iterdir())])
    argv = {
        "prepare": ["prepare", "--input", str(folder), "--out", str(out), "--multiple-of", "16", "--region", "abdomen"],
        "fid": ["evaluate", "fid", "--real", str(good), "--fake", str(folder), "--out", str(out)],
        "diversity": ["evaluate", "diversity", "--data", str(folder), "--out", str(out)],
        "reconstruction": ["evaluate", "reconstruction", "--vae", str(tiny_vae), "--data", str(folder),
                           "--out", str(out)],
        "quality": ["evaluate", "quality", "--images", str(folder), "--labels", str(labels), "--out", str(out)],
        "consistency": ["evaluate", "consistency", "--images", str(folder), "--masks", str(labels),
                        "--segmenter", str(tmp_path / "no_segmenter_needed.safetensors"), "--out", str(out)],
        "generate --mask": ["generate", "--mask", str(bad), "--out", str(out), "--steps", "1", "--no-progress"],
        "train vae": ["train", "vae", "--data", str(datalist), "--out", str(out), *TRAIN_VAE],
    }[entry]
    _refused(capsys, main(argv), bad, out, BAD_VOLUMES[kind][1])


def test_controlnet_training_refuses_a_bad_label_map_before_the_run_folder(tmp_path, capsys, released):
    """The label maps a ControlNet run reads are checked with the datalist, before the UNet loads or --out exists."""
    datalist = latent_datalist(tmp_path / "data", n=2, labels=True)
    bad = tmp_path / "data" / "case1_label.nii.gz"
    _nan(bad)
    out = tmp_path / "run"
    rc = main(["train", "controlnet", "--data", str(datalist), "--out", str(out), "--unet", str(released["unet"]),
               "--config", "tiny", "--steps", "1", "--device", "cpu", "--no-progress", "--no-tensorboard"])
    err = _refused(capsys, rc, bad, out, "NaN or infinite")
    assert "case0_label" not in err  # the good label map is not blamed


def test_bad_label_maps_refused(tmp_path, capsys, good):
    """A label map with ids outside the MAISI vocabulary (evaluation), or with NaN (prepare), is refused by name."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    (images / "p0_image.nii.gz").write_bytes((good / "p0_image.nii.gz").read_bytes())
    write_volume(labels / "p0_label.nii.gz", np.full(SHAPE, 250, np.uint8), AFFINE, np.uint8)  # not a MAISI id
    out = tmp_path / "out"
    rc = main(["evaluate", "quality", "--images", str(images), "--labels", str(labels), "--out", str(out)])
    _refused(capsys, rc, labels / "p0_label.nii.gz", out, "not in the MAISI vocabulary")
    a = np.zeros(SHAPE, np.float32)
    a[0, 0, 0] = np.nan
    write_volume(images / "p0_label.nii.gz", a, AFFINE)  # beside its image: prepare pairs them by name
    rc = main(["prepare", "--input", str(images), "--out", str(out), "--multiple-of", "16"])
    _refused(capsys, rc, images / "p0_label.nii.gz", out, "NaN or infinite")


def test_quality_never_reports_a_pass_it_did_not_measure(tmp_path, capsys, good):
    """MAISI ids, but none of the quality check's organ groups: 'not checked', exit 1, never '1/1 passed'."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    (images / "p0_image.nii.gz").write_bytes((good / "p0_image.nii.gz").read_bytes())
    lab = np.zeros(SHAPE, np.uint8)
    lab[4:12, 4:12, 4:12] = 62  # a MAISI organ outside every quality group
    write_volume(labels / "p0_label.nii.gz", lab, AFFINE, np.uint8)
    out = tmp_path / "out"
    rc = main(["evaluate", "quality", "--images", str(images), "--labels", str(labels), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "0/1 volumes passed" in printed and "NOT CHECKED" in printed
    assert "p0_image.nii.gz: NOT CHECKED" in printed and "FAIL" not in printed  # the progress line too
    summary = json.loads((out / "quality.json").read_text())["summary"]
    assert summary["passed"] == 0 and summary["not_checked"] == 1


def test_metrics_refuse_non_finite_volumes():
    a = torch.rand(1, 1, 16, 16, 16)
    b = a.clone()
    b[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ms_ssim(a, b)


# ---------------------------------------------------------------------------------------------
# Checkpoints: a NaN/inf/non-positive scale_factor, a pickle that would run code
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Path]:
    """Tiny networks in NVIDIA's released .pt layout: autoencoder, UNet (+ scale_factor) and ControlNet."""
    root = tmp_path_factory.mktemp("released")
    unet = build("unet", TINY)
    files = {"autoencoder": root / "autoencoder_v1.pt", "unet": root / "diff_unet_3d_rflow-ct.pt",
             "controlnet": root / "controlnet_3d_rflow-ct.pt"}
    torch.save(build("autoencoder", TINY).state_dict(), files["autoencoder"])
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(0.8)}, files["unet"])
    torch.save({"controlnet_state_dict": ControlNet.from_unet(unet, TINY.controlnet).state_dict()},
               files["controlnet"])
    return files


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0])
def test_released_unet_with_a_bad_scale_factor_is_refused_at_load(tmp_path, capsys, released, scale):
    bad = tmp_path / "diff_unet_3d_rflow-ct.pt"
    obj = torch.load(released["unet"], weights_only=True)
    obj["scale_factor"] = torch.tensor(scale)
    torch.save(obj, bad)
    out = tmp_path / "out"
    rc = main(["generate", "--weights", str(released["autoencoder"]), str(bad), str(released["controlnet"]),
               "--config", "tiny", "--out", str(out), "--size", "32", "--spacing", "8", "--steps", "1",
               "--no-progress", "--device", "cpu"])
    _refused(capsys, rc, bad, out, "scale_factor")
    with pytest.raises(ckpt.CheckpointError, match="scale_factor"):
        networks.load_released(bad, "unet", TINY)


def test_project_checkpoint_with_a_nan_scale_factor_is_refused(tmp_path):
    folder = ckpt.save_pretrained(tmp_path / "unet", torch.nn.Linear(2, 2), TINY, "unet", {"scale_factor": 0.5})
    meta = json.loads((folder / "config.json").read_text())
    meta["extra"]["scale_factor"] = float("nan")
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="scale_factor") as err:
        ckpt.read_pretrained_config(folder)
    assert str(folder / "config.json") in str(err.value)


class _Payload:
    """Unpickling this runs code that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('ran')",))


@pytest.mark.parametrize("entry", ["generate", "reconstruction", "prepare"])
def test_pickle_with_code_is_refused_and_never_run(tmp_path, capsys, good, released, entry):
    marker = tmp_path / "PWNED"
    evil = tmp_path / ("diff_unet_3d_rflow-ct.pt" if entry == "generate" else "autoencoder_v1.pt")
    torch.save({"unet_state_dict": {}, "payload": _Payload(marker)}, evil)
    out = tmp_path / "out"
    argv = {
        "generate": ["generate", "--weights", str(released["autoencoder"]), str(evil), str(released["controlnet"]),
                     "--config", "tiny", "--out", str(out), "--steps", "1", "--no-progress", "--device", "cpu"],
        "reconstruction": ["evaluate", "reconstruction", "--vae", str(evil), "--preset", "tiny", "--data", str(good),
                           "--out", str(out)],
        "prepare": ["prepare", "--input", str(good), "--out", str(out), "--vae", str(evil), "--vae-preset", "tiny",
                    "--device", "cpu", "--multiple-of", "16"],
    }[entry]
    _refused(capsys, main(argv), evil, out, "refused to load")
    assert not marker.exists(), "the pickle's code ran"


# ---------------------------------------------------------------------------------------------
# Output locations and inputs that do not exist
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_datalist(tmp_path_factory, good) -> Path:
    return _datalist(tmp_path_factory.mktemp("datalist") / "train.json",
                     [{"image": good / f"p{s}_image.nii.gz"} for s in (0, 1)])


@pytest.mark.parametrize("where", ["existing file", "under a file"])
@pytest.mark.parametrize("entry", ["generate", "prepare", "diversity", "train vae"])
def test_bad_out_refused_before_any_work(tmp_path, capsys, good, good_datalist, where, entry):
    blocker = tmp_path / "taken.nii.gz"
    blocker.write_bytes(b"someone else's file")
    out = blocker if where == "existing file" else blocker / "sub"
    argv = {
        "generate": ["generate", "--out", str(out), "--steps", "1", "--no-progress", "--num-samples", "1"],
        "prepare": ["prepare", "--input", str(good), "--out", str(out), "--multiple-of", "16"],
        "diversity": ["evaluate", "diversity", "--data", str(good), "--out", str(out)],
        "train vae": ["train", "vae", "--data", str(good_datalist), "--out", str(out), *TRAIN_VAE],
    }[entry]
    _refused(capsys, main(argv), out, None, "file")
    assert blocker.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.nii.gz"]


@pytest.mark.parametrize("where", ["existing folder", "under a file"])
def test_segmenter_out_path_refused_before_training(tmp_path, capsys, where):
    blocker = tmp_path / "taken"
    if where == "existing folder":
        blocker.mkdir()
        out = blocker
    else:
        blocker.write_bytes(b"someone else's file")
        out = blocker / "seg.safetensors"
    rc = main(["evaluate", "train-segmenter", "--out-path", str(out), "--steps", "1", "--phantoms", "1",
               "--size", "16", "16", "16"])
    _refused(capsys, rc, out, None, "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    if where == "existing folder":
        assert not any(blocker.iterdir())
    else:
        assert blocker.read_bytes() == b"someone else's file"


@pytest.mark.parametrize("where", ["existing file", "under a file"])
def test_library_generate_checks_out_before_any_compute(tmp_path, random_tiny_networks, monkeypatch, where):
    """Pipeline.generate called from Python (not the CLI) refuses a bad `out` before sampling."""
    blocker = tmp_path / "taken.nii.gz"
    blocker.write_bytes(b"someone else's file")
    out = blocker if where == "existing file" else blocker / "sub"
    nets = random_tiny_networks()
    sources = {c: {"path": "<memory>", "sha256": "0" * 64, "format": "maisi"} for c in nets}
    pipe = Pipeline(Networks(nets["autoencoder"], nets["unet"], nets["controlnet"], TINY, 1.0, sources,
                             trained_schedule="rflow"), device="cpu", progress=False)

    def no_compute(*args, **kwargs):
        raise AssertionError("sampling started before `out` was checked")

    monkeypatch.setattr(pipe, "sample_latents", no_compute)
    request = GenerationRequest(size=(32, 32, 32), spacing=(8.0, 8.0, 8.0), steps=1, mask_source="none",
                                quality_check=False)
    with pytest.raises(ValueError, match="file") as err:
        pipe.generate(request, out=out)
    assert str(out) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.nii.gz"]


def test_prepare_with_a_missing_input_creates_no_output_folder(tmp_path, capsys):
    out = tmp_path / "x"
    _refused(capsys, main(["prepare", "--input", str(tmp_path / "nothere"), "--out", str(out)]),
             tmp_path / "nothere", out)
    with pytest.raises(FileNotFoundError, match="nothere"):
        prepare_all(tmp_path / "nothere", out, PrepareConfig(), log=lambda s: None)
    assert not out.exists()
    # the inputs are checked before the VAE is even looked for
    err = _refused(capsys, main(["prepare", "--input", str(tmp_path / "nothere"), "--out", str(out), "--vae",
                                 str(tmp_path / "no_vae_here")]), tmp_path / "nothere", out)
    assert "no_vae_here" not in err


# ---------------------------------------------------------------------------------------------
# Written files respect the umask (not mkstemp's 0600)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        files = [atomic_write_text(tmp_path / "a.json", "{}"),
                 write_volume(tmp_path / "v.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))]
        folder = ckpt.save_pretrained(tmp_path / "ck", torch.nn.Linear(2, 2), TINY, "unet")
        files += [folder / ckpt.WEIGHTS_FILE, folder / ckpt.CONFIG_FILE]
    finally:
        os.umask(old)
    for f in files:
        assert f.stat().st_mode & 0o777 == mode, f"{f.name}: {oct(f.stat().st_mode & 0o777)}"


# ---------------------------------------------------------------------------------------------
# prepare without a mapping: label ids that look foreign are warned about, with the way to map them
# ---------------------------------------------------------------------------------------------


def _scan_with_label(folder: Path, label: np.ndarray) -> None:
    ph = make_phantom("chest", SHAPE, 12.0, seed=3)
    write_volume(folder / "c_image.nii.gz", np.round(ph.image), ph.affine, np.int16)
    write_volume(folder / "c_label.nii.gz", label, ph.affine, np.uint8)


@pytest.mark.parametrize("ids, why", [
    ({1: (slice(4, 8),) * 3}, "only 1 distinct id"),  # a lesion mask: its 1 would be read as liver
    ({22: (slice(0, 2),) * 3, 3: (slice(4, 6),) * 3, 5: (slice(8, 10),) * 3}, "none of chest between them"),
])
def test_prepare_warns_about_foreign_label_ids(tmp_path, capsys, ids, why):
    label = np.zeros(SHAPE, np.uint8)
    for i, where in ids.items():
        label[where] = i
    _scan_with_label(tmp_path / "in", label)
    with pytest.warns(LabelIdsWarning, match=why):
        report = prepare_all(tmp_path / "in", tmp_path / "a", PrepareConfig(multiple_of=16), log=lambda s: None)
    assert "label_mapping" in report["warnings"]["c"][0] and "--" not in report["warnings"]["c"][0]
    rc = main(["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "b"), "--multiple-of", "16"])
    err = capsys.readouterr().err
    assert rc == 0 and "maisi prepare: warning:" in err and "c_label.nii.gz" in err and "--label-mapping" in err
    assert json.loads((tmp_path / "b" / "c_image.json").read_text())["warnings"]


def test_prepare_does_not_warn_about_a_maisi_label_map(tmp_path, good):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelIdsWarning)
        report = prepare_all(good, tmp_path / "out", PrepareConfig(multiple_of=16), log=lambda s: None)
    assert sorted(report["done"]) == ["p0", "p1"] and "warnings" not in report
