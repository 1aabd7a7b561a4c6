"""Preparation of scans: NIfTI and DICOM inputs, latents μ/σ + sidecars + datalist, resumability, bad cases."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_helpers import PoolEncoder, write_dicom_series
from maisi.cli import main
from maisi.data.labelmap import body_mask
from maisi.data.phantom import make_phantom, write_phantom
from maisi.data.prepare import PrepareConfig, discover, prepare_all, target_shape
from maisi.io.volume import read_volume, write_volume
from maisi.networks.autoencoder import Autoencoder


@pytest.fixture()
def scans(tmp_path):
    """Two NIfTI abdomen phantoms and the first again as a DICOM series with a NIfTI label."""
    src = tmp_path / "in"
    phs = [make_phantom("abdomen", (40, 40, 30), 8.0, seed=s) for s in range(2)]
    for s, ph in enumerate(phs):
        write_phantom(ph, src, f"case{s}")
    write_dicom_series(src / "dcm0", np.round(phs[0].image), phs[0].spacing, phs[0].affine[:3, 3])
    write_volume(src / "dcm0_label.nii.gz", phs[0].label, phs[0].affine, np.uint8)
    return src, phs


def test_discover_pairs_images_labels_and_dicom(scans):
    src, _ = scans
    cases = {c.name: c for c in discover(src)}
    assert set(cases) == {"case0", "case1", "dcm0"}
    assert cases["case0"].label.name == "case0_label.nii.gz"
    assert cases["dcm0"].image.is_dir() and cases["dcm0"].label.name == "dcm0_label.nii.gz"


def test_prepare_writes_latents_sidecars_and_datalist(scans, tmp_path):
    src, phs = scans
    out = tmp_path / "out"
    enc = PoolEncoder()
    report = prepare_all(src, out, PrepareConfig(multiple_of=32), enc, "pool", log=lambda s: None)
    assert sorted(report["done"]) == ["case0", "case1", "dcm0"] and not report["failed"]
    side = json.loads((out / "case0_latent.json").read_text())
    assert side["dim"] == [32, 32, 32] == list(target_shape((40, 40, 30), 32))
    assert side["spacing"] == pytest.approx([10.0, 10.0, 7.5])  # field of view kept: 40·8 = 32·10
    assert side["top_region_index"] == side["bottom_region_index"] == [0, 0, 1, 0]
    assert side["modality"] == "ct"
    lat = load_file(out / side["latent"])
    assert lat["mu"].shape == lat["sigma"].shape == (4, 8, 8, 8)
    assert float(lat["sigma"].min()) >= 0.01  # σ stored, not a sample
    # The DICOM series of the same phantom gives the same latents (orientation and HU rescale honoured).
    lat_d = load_file(out / "dcm0_latent.safetensors")
    torch.testing.assert_close(lat_d["mu"], lat["mu"], atol=1e-4, rtol=0)
    lab = read_volume(out / side["label"])
    assert lab.array.shape == (32, 32, 32) and lab.spacing == pytest.approx((10.0, 10.0, 7.5))
    assert {1, 3, 200} <= set(np.unique(lab.array).tolist())
    # [0, 1] intensities: the HU window maps air to 0 and the body into (0, 1).
    assert 0.0 <= float(lat["mu"].min()) and float(lat["mu"].max()) <= 1.0
    datalist = json.loads((out / "datalist.json").read_text())["training"]
    assert len(datalist) == 3
    for e in datalist:
        assert (out / e["image"]).is_file() and (out / e["label"]).is_file()
        assert set(e) >= {"dim", "spacing", "top_region_index", "bottom_region_index", "modality"}


def test_rerun_skips_finished_cases_and_redoes_missing_ones(scans, tmp_path):
    src, _ = scans
    out = tmp_path / "out"
    cfg = PrepareConfig(multiple_of=16)
    prepare_all(src, out, cfg, PoolEncoder(), "pool", log=lambda s: None)
    stamp = os.stat(out / "case1_latent.safetensors").st_mtime_ns
    (out / "case0_latent.safetensors").unlink()  # as if killed before the latent was written
    enc = PoolEncoder()
    report = prepare_all(src, out, cfg, enc, "pool", log=lambda s: None)
    assert report["done"] == ["case0"] and sorted(report["skipped"]) == ["case1", "dcm0"] and enc.calls == 1
    assert os.stat(out / "case1_latent.safetensors").st_mtime_ns == stamp
    # Other settings (another encoder) redo everything.
    report = prepare_all(src, out, cfg, PoolEncoder(), "other", log=lambda s: None)
    assert len(report["done"]) == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_a_changed_input_is_prepared_again(scans, tmp_path):
    src, phs = scans
    out = tmp_path / "out"
    cfg = PrepareConfig(multiple_of=16)
    prepare_all(src, out, cfg, PoolEncoder(), "pool", log=lambda s: None)
    # case1 replaced by another scan under the same name: its old latent must not count as done
    write_phantom(make_phantom("abdomen", (40, 40, 50), 8.0, seed=9), src, "case1")
    report = prepare_all(src, out, cfg, PoolEncoder(), "pool", log=lambda s: None)
    assert report["done"] == ["case1"] and sorted(report["skipped"]) == ["case0", "dcm0"]
    assert json.loads((out / "case1_latent.json").read_text())["dim"][2] == 48  # 50 slices, not the old 30


def test_new_encoder_weights_at_the_same_path_are_prepared_again(scans, tmp_path):
    src, _ = scans
    out, cfg = tmp_path / "out", PrepareConfig(multiple_of=16)
    prepare_all(src, out, cfg, PoolEncoder(), "vae/", encoder_sha256="aa", log=lambda s: None)
    assert prepare_all(src, out, cfg, PoolEncoder(), "vae/", encoder_sha256="aa", log=lambda s: None)["done"] == []
    report = prepare_all(src, out, cfg, PoolEncoder(), "vae/", encoder_sha256="bb", log=lambda s: None)
    assert len(report["done"]) == 3
    assert json.loads((out / "case0_latent.json").read_text())["settings"]["encoder_sha256"] == "bb"


def test_the_output_folder_never_overwrites_inputs(scans, tmp_path, capsys):
    src, _ = scans
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    # the input folder itself: the images would be replaced by their prepared versions
    assert main(["prepare", "--input", str(src), "--out", str(src), "--multiple-of", "16"]) == 2
    err = capsys.readouterr().err
    assert "would overwrite input files" in err and "case0_image.nii.gz" in err and "output folder (--out)" in err
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before
    # an output folder inside the input folder is not read back as a case the second time
    inner = src / "prep"
    assert main(["prepare", "--input", str(src), "--out", str(inner), "--multiple-of", "16"]) == 0
    assert main(["prepare", "--input", str(src), "--out", str(inner), "--multiple-of", "16"]) == 0
    assert "prepared 0, skipped 3 (already done), failed 0" in capsys.readouterr().out


@pytest.mark.parametrize("entry, match", [({"image": 123}, "entry 0 has no 'image' path"),
                                          ({"image": "a.nii.gz", "label": 5}, "'label' must be a path")])
def test_malformed_datalist_entries_are_named(tmp_path, entry, match):
    (tmp_path / "d.json").write_text(json.dumps({"training": [entry]}))
    with pytest.raises(ValueError, match=match):
        discover(tmp_path / "d.json")


def test_memory_budget_is_checked_with_the_options():
    with pytest.raises(ValueError, match="memory_gb must be positive"):
        PrepareConfig(memory_gb=0)


def test_bad_cases_are_reported_and_the_rest_is_done(scans, tmp_path, capsys):
    """Pairs that do not fit are per-case failures; an unreadable file refuses the run before any work."""
    src, phs = scans
    write_volume(src / "odd_image.nii.gz", np.round(phs[1].image[:, :, :20]), phs[1].affine, np.int16)
    write_volume(src / "odd_label.nii.gz", phs[1].label, phs[1].affine, np.uint8)  # 30 slices vs 20
    shifted = phs[1].affine.copy()
    shifted[0, 3] += 50.0
    write_volume(src / "moved_image.nii.gz", np.round(phs[1].image), phs[1].affine, np.int16)
    write_volume(src / "moved_label.nii.gz", phs[1].label, shifted, np.uint8)
    out = tmp_path / "out"
    rc = main(["prepare", "--input", str(src), "--out", str(out), "--multiple-of", "16"])
    assert rc == 1
    report = json.loads((out / "prepare_report.json").read_text())
    assert sorted(report["done"]) == ["case0", "case1", "dcm0"]
    assert "shape" in report["failed"]["odd"] and "differ" in report["failed"]["odd"]
    assert "affines differ" in report["failed"]["moved"]
    assert len(json.loads((out / "datalist.json").read_text())["training"]) == 3
    (src / "broken_image.nii.gz").write_bytes(b"not a nifti file at all")
    capsys.readouterr()
    assert main(["prepare", "--input", str(src), "--out", str(tmp_path / "out2"), "--multiple-of", "16"]) == 2
    assert "broken_image.nii.gz: cannot read as NIfTI" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_unlabelled_scan_needs_a_region_and_gets_a_body_mask(tmp_path):
    ph = make_phantom("chest", (32, 32, 24), 8.0, seed=4)
    write_volume(tmp_path / "in" / "scan.nii.gz", np.round(ph.image), ph.affine, np.int16)
    report = prepare_all(tmp_path / "in", tmp_path / "a", PrepareConfig(multiple_of=16), log=lambda s: None)
    assert "give region" in report["failed"]["scan"]  # the field; `maisi prepare` prints --region
    report = prepare_all(tmp_path / "in", tmp_path / "b", PrepareConfig(multiple_of=16, region="chest"),
                         log=lambda s: None)
    assert report["done"] == ["scan"]
    side = json.loads((tmp_path / "b" / "scan_image.json").read_text())
    assert side["top_region_index"] == [0, 1, 0, 0] and (tmp_path / "b" / side["image"]).is_file()
    lab = read_volume(tmp_path / "b" / side["label"]).array
    assert set(np.unique(lab).tolist()) == {0, 200}


def test_body_mask_matches_the_phantom_body():
    ph = make_phantom("abdomen", (40, 40, 24), 8.0, seed=1)
    body = body_mask(ph.image)
    truth = ph.label > 0
    iou = (body & truth).sum() / (body | truth).sum()
    assert iou > 0.95
    # Air inside the body (bowel gas, lungs) is not outside air.
    assert body[np.isin(ph.label, (62, 12))].all()


def test_prepare_with_the_project_vae(tmp_path):
    """With the real (tiny) autoencoder: latents have its channel count and a quarter of the image size."""
    from maisi.config import preset
    from maisi.networks import build

    torch.manual_seed(0)
    vae = build("autoencoder", preset("tiny")).eval()
    assert isinstance(vae, Autoencoder)
    ph = make_phantom("pelvis", (16, 16, 16), 16.0, seed=0)
    write_phantom(ph, tmp_path / "in", "p")
    report = prepare_all(tmp_path / "in", tmp_path / "out", PrepareConfig(multiple_of=16), vae, "tiny",
                         log=lambda s: None)
    assert report["done"] == ["p"]
    lat = load_file(tmp_path / "out" / "p_latent.safetensors")
    c = preset("tiny").autoencoder.latent_channels
    assert lat["mu"].shape == (c, 4, 4, 4) and bool((lat["sigma"] > 0).all())
    from maisi.data.prepare import resample

    img, _, _ = resample(ph.image.round(), None, ph.affine, PrepareConfig(multiple_of=16))
    with torch.no_grad():
        mu, _ = vae.encode_within(torch.from_numpy(img)[None, None])
    torch.testing.assert_close(lat["mu"], mu[0])


def test_training_reads_prepared_latents_and_sidecars(scans, tmp_path):
    """The trainer's latent loader takes `maisi prepare` output as it is (datalist, or sidecar alone)."""
    from maisi.data.datalist import read_datalist
    from maisi.data.datasets import LatentCases

    src, _ = scans
    out = tmp_path / "out"
    prepare_all(src, out, PrepareConfig(multiple_of=16), PoolEncoder(), "pool", log=lambda s: None)
    entries = read_datalist(out / "datalist.json")
    cases = LatentCases(entries, channels=4, with_label=True)
    item = cases.load(0, torch.Generator().manual_seed(0))
    assert item["latent"].shape == (4, 8, 8, 8) and item["label"].shape == (1, 32, 32, 32)
    assert item["top_region_index"].tolist() == [0, 0, 1, 0] and int(item["modality"]) == 1
    bare = [{"image": e["image"], "_where": "bare"} for e in entries]  # conditions from the sidecar only
    cases = LatentCases(bare, channels=4)
    torch.testing.assert_close(cases.load(0, torch.Generator())["spacing"], item["spacing"])


def test_prepare_cli_loads_a_vae_checkpoint_folder(tmp_path):
    from maisi.config import preset
    from maisi.io.checkpoint import save_pretrained
    from maisi.networks import build

    cfg = preset("tiny")
    save_pretrained(tmp_path / "vae", build("autoencoder", cfg), cfg, "autoencoder")
    write_phantom(make_phantom("chest", (16, 16, 16), 15.0, seed=0), tmp_path / "in", "c")
    rc = main(["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--vae",
               str(tmp_path / "vae"), "--multiple-of", "16", "--device", "cpu"])
    assert rc == 0
    assert load_file(tmp_path / "out" / "c_latent.safetensors")["mu"].shape == (4, 4, 4, 4)
    assert main(["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--vae",
                 str(tmp_path / "nope")]) == 2


def test_prepare_streams_a_scan_under_a_small_budget_and_says_so(tmp_path):
    """A budget below the in-memory split's floor encodes by streaming: same latents, plan in sidecar and log."""
    from maisi.config import preset
    from maisi.networks import build
    from maisi.networks.memory import estimate_peak

    torch.manual_seed(0)
    vae = build("autoencoder", preset("tiny")).eval()
    ph = make_phantom("pelvis", (32, 32, 16), 8.0, seed=0)
    write_phantom(ph, tmp_path / "in", "p")
    prepare_all(tmp_path / "in", tmp_path / "plain", PrepareConfig(multiple_of=16), vae, "tiny", log=lambda s: None)
    floor = min(estimate_peak(vae, "encode", (1, 1, 32, 32, 16), k) for k in range(1, 33)) / 1024**3
    lines: list[str] = []
    prepare_all(tmp_path / "in", tmp_path / "out", PrepareConfig(multiple_of=16, memory_gb=floor * 0.9), vae, "tiny",
                log=lines.append)
    side = json.loads((tmp_path / "out" / "p_latent.json").read_text())
    assert side["encode_plan"].startswith("streaming") and "; encoded: streaming" in lines[-1]
    a, b = load_file(tmp_path / "plain" / "p_latent.safetensors"), load_file(tmp_path / "out" / "p_latent.safetensors")
    torch.testing.assert_close(a["mu"], b["mu"], atol=1e-5, rtol=0)
