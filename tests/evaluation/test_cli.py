"""`maisi evaluate` end to end on tiny phantoms: reports, feature cache, segmenters, VAE, clear errors."""

import json

import numpy as np
import pytest
import torch

from maisi.cli import main
from maisi.data.phantom import make_phantom, write_phantom
from maisi.evaluation.inputs import list_volumes, pair_volumes
from maisi.evaluation.runs import evaluate_consistency
from maisi.evaluation.segmenter import PHANTOM_LABELS, PhantomSegmenter, _net, load_segmenter, save_segmenter
from maisi.io.volume import affine_from_spacing, read_volume, write_volume

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    for name, seeds in (("a", (0, 1)), ("b", (10, 11))):
        for s in seeds:
            write_phantom(make_phantom("abdomen", size=24, spacing=7.0, seed=s), root / name, f"p{s}")
    return root


def test_fid_cli_report_and_cache(sets, tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["evaluate", "fid", "--real", str(sets / "a"), "--fake", str(sets / "b"), "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out
    report = json.loads((out / "fid.json").read_text())
    assert report["extractor"].startswith("efficientnet-lite0@")
    assert set(report["fid"]) == {"xy", "yz", "zx", "mean"} and report["fid"]["mean"] > 0
    assert report["slices"]["real"]["xy"] == 48 and (out / "fid_planes.png").is_file()
    assert "efficientnet-lite0" in (out / "fid.md").read_text()
    assert len(list((out / "feature_cache").glob("*.safetensors"))) == 4 and "(cached)" not in first
    assert main(args) == 0
    assert capsys.readouterr().out.count("(cached)") == 4
    assert json.loads((out / "fid.json").read_text())["fid"] == report["fid"]
    # A set against itself: FID 0
    assert main(["evaluate", "fid", "--real", str(sets / "a"), "--fake", str(sets / "a"), "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads((out / "fid.json").read_text())["fid"]["mean"] == pytest.approx(0, abs=1e-6)


def test_inputs_and_errors(sets, tmp_path, capsys):
    assert [p.name for p in list_volumes(sets / "a")] == ["p0_image.nii.gz", "p1_image.nii.gz"]
    pairs = pair_volumes(sets / "a", sets / "a")
    assert all(i.name.replace("_image", "_label") == m.name for i, m in pairs)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "fid", "--real", str(empty), "--fake", str(sets / "b"), "--out", str(tmp_path)]) == 2
    assert "no volumes found" in capsys.readouterr().err
    assert main(["evaluate", "fid", "--real", str(sets / "a"), "--fake", str(sets / "b"), "--extractor",
                 f"radimagenet:{tmp_path / 'missing.pt'}", "--out", str(tmp_path)]) == 2
    assert "RadImageNet weights not found" in capsys.readouterr().err
    # mismatched shapes for diversity
    mixed = tmp_path / "mixed"
    write_volume(mixed / "x.nii.gz", np.zeros((20, 20, 20), np.float32), affine_from_spacing((1, 1, 1)))
    write_volume(mixed / "y.nii.gz", np.zeros((20, 20, 24), np.float32), affine_from_spacing((1, 1, 1)))
    assert main(["evaluate", "diversity", "--data", str(mixed), "--out", str(tmp_path)]) == 2
    assert "differ in shape" in capsys.readouterr().err
    assert main(["evaluate", "diversity", "--data", str(sets / "a"), "--out", str(tmp_path), "--quiet"]) == 0
    assert 0 < json.loads((tmp_path / "diversity.json").read_text())["ms_ssim_mean"] < 1
    assert main(["evaluate", "consistency", "--images", str(sets / "a"), "--masks", str(sets / "b") + "/p10_label.nii.gz",
                 "--segmenter", "x", "--out", str(tmp_path)]) == 2
    assert "2 images but 1 label" in capsys.readouterr().err


def test_consistency_with_oracle_and_saved_segmenter(sets, tmp_path):
    pairs = pair_volumes(sets / "a", sets / "a")
    # An oracle segmenter returns the true label map (looked up by the image's HU sum): Dice 1 everywhere.
    labels = {float(read_volume(i).array.sum()): np.asarray(read_volume(m).array) for i, m in pairs}
    oracle = evaluate_consistency(pairs, lambda hu: torch.from_numpy(labels[float(hu.numpy().astype(np.float64).sum())]))
    assert oracle["mean_dice"] == pytest.approx(1.0) and "200" not in oracle["labels"]
    torch.manual_seed(0)
    path = tmp_path / "seg.safetensors"
    save_segmenter(PhantomSegmenter(_net(len(PHANTOM_LABELS) + 1), PHANTOM_LABELS, (7.0, 7.0, 7.0)), path)
    seg = load_segmenter(path)
    assert seg.labels == PHANTOM_LABELS and seg(torch.zeros(24, 24, 24)).shape == (24, 24, 24)
    out = tmp_path / "rep"
    assert main(["evaluate", "consistency", "--images", str(sets / "a"), "--masks", str(sets / "a"),
                 "--segmenter", str(path), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "consistency.json").read_text())
    assert set(rep["labels"]) <= {str(v) for v in PHANTOM_LABELS} and 0 <= rep["mean_dice"] <= 1
    assert (out / "consistency_dice.png").is_file()


def test_reconstruction_and_quality_cli(sets, tmp_path, capsys):
    from maisi.config import preset
    from maisi.io.checkpoint import save_pretrained
    from maisi.networks import build

    cfg = preset("tiny")
    torch.manual_seed(0)
    save_pretrained(tmp_path / "vae", build("autoencoder", cfg), cfg, "autoencoder")
    out = tmp_path / "rep"
    assert main(["evaluate", "reconstruction", "--vae", str(tmp_path / "vae"), "--data", str(sets / "a"),
                 "--out", str(out), "--quiet", "--memory-gb", "1"]) == 0
    rep = json.loads((out / "reconstruction.json").read_text())
    assert np.isfinite(rep["mean"]["psnr"]) and 0 < rep["mean"]["mae_hu"] <= 2000
    assert main(["evaluate", "reconstruction", "--vae", str(tmp_path / "nope.pt"), "--data", str(sets / "a")]) == 2
    assert "no VAE checkpoint" in capsys.readouterr().err
    assert main(["evaluate", "quality", "--images", str(sets / "a"), "--labels", str(sets / "a"),
                 "--reference-images", str(sets / "b"), "--reference-labels", str(sets / "b"),
                 "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "quality.json").read_text())
    assert rep["summary"]["passed"] == 2 and "liver" in rep["summary"]["groups"]
    assert (out / "quality_hist_liver.png").is_file()


def test_train_phantom_segmenter_runs_and_reloads(tmp_path):
    from maisi.evaluation.segmenter import train_phantom_segmenter

    lines = []
    seg = train_phantom_segmenter(tmp_path / "s.safetensors", steps=2, size=(32, 32, 32), spacing=(6, 6, 6),
                                  n_phantoms=2, batch=1, log=lines.append)
    assert lines[-1].startswith("step 2/2") and np.isfinite(seg.info["final_loss"])
    again = load_segmenter(tmp_path / "s.safetensors")
    hu = torch.from_numpy(make_phantom("chest", size=32, spacing=6.0, seed=3).image)
    assert torch.equal(again(hu, spacing=(6, 6, 6)), seg(hu, spacing=(6, 6, 6)))
    assert again(hu[:20], spacing=(6, 6, 6)).shape == (20, 32, 32)  # padded to ×16 inside, cropped back
    with pytest.raises(ValueError, match="multiple of 16"):
        train_phantom_segmenter(tmp_path / "x.safetensors", steps=1, size=(30, 32, 32))


class _Threshold(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits: channel 1 (= label id 1) where HU > 0
        return torch.cat([torch.zeros_like(x), (x > 0).float()], 1)


def test_torchscript_segmenter(tmp_path):
    path = tmp_path / "seg.pt"
    torch.jit.script(_Threshold()).save(str(path))
    seg = load_segmenter(path)
    hu = torch.full((8, 8, 8), -500.0)
    hu[:3] = 100
    out = seg(hu)
    assert out.dtype == torch.long and int(out.sum()) == 3 * 64
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(ValueError, match="neither"):
        load_segmenter(junk)
    with pytest.raises(FileNotFoundError, match="train one"):
        load_segmenter(tmp_path / "missing.safetensors")


def test_train_segmenter_defaults_are_one_recipe():
    # the flags, the options and the library function default to the same recipe (the one the docs measured)
    import inspect

    from maisi.cli import build_parser
    from maisi.cli.evaluate import options_from_args
    from maisi.evaluation.options import SegmenterOptions
    from maisi.evaluation.segmenter import train_phantom_segmenter

    from_flags = options_from_args(build_parser().parse_args(["evaluate", "train-segmenter", "--out-path", "s"]))
    assert from_flags == SegmenterOptions(out_path="s")
    lib = {k: v.default for k, v in inspect.signature(train_phantom_segmenter).parameters.items()}
    o = SegmenterOptions(out_path="s")
    assert (o.steps, o.phantoms, o.size, o.spacing, o.seed, o.augment, o.channels) == (
        lib["steps"], lib["n_phantoms"], tuple(lib["size"]), tuple(lib["spacing"]), lib["seed"], lib["augment"],
        tuple(lib["channels"]))
