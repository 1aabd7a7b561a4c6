"""The evaluations as library functions: typed options in, a Report out, nothing printed; errors name fields."""

import json
from pathlib import Path

import numpy as np
import pytest

from maisi.cli import main
from maisi.data.phantom import make_phantom, write_phantom
from maisi.evaluation import evaluate
from maisi.evaluation.errors import OptionError
from maisi.evaluation.fid import FIDSettings
from maisi.evaluation.options import (
    DiversityOptions,
    FIDOptions,
    QualityOptions,
    ReconstructionOptions,
    Report,
    SegmenterOptions,
)
from maisi.io.volume import affine_from_spacing, write_volume

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    for s in (0, 1):
        write_phantom(make_phantom("abdomen", size=24, spacing=7.0, seed=s), root, f"p{s}")
    return root


@pytest.mark.parametrize("name, options", [
    ("diversity", lambda d, out: DiversityOptions(data=d, out=out)),
    ("quality", lambda d, out: QualityOptions(images=d, labels=d, reference_images=d, reference_labels=d, out=out)),
])
def test_evaluations_are_typed_functions_that_print_nothing(phantoms, tmp_path, capsys, name, options):
    lines = []
    report = evaluate.EVALUATIONS[name](options(phantoms, tmp_path / "rep"), log=lines.append)
    assert isinstance(report, Report) and report.name == name and report.passed
    assert capsys.readouterr() == ("", "")  # progress went to `log`, the summary is returned
    assert len(lines) >= 1 and report.summary
    assert {p.name for p in report.files} >= {f"{name}.json", f"{name}.md"} and all(p.is_file() for p in report.files)
    assert json.loads((tmp_path / "rep" / f"{name}.json").read_text()) == json.loads(json.dumps(report.data))
    # without a log: silent too, and the same numbers
    again = evaluate.EVALUATIONS[name](options(phantoms, tmp_path / "rep2"))
    assert capsys.readouterr() == ("", "") and again.data == report.data


def _mismatched(tmp_path):
    mixed = tmp_path / "mixed"
    write_volume(mixed / "x.nii.gz", np.zeros((20, 20, 20), np.float32), affine_from_spacing((1, 1, 1)))
    write_volume(mixed / "y.nii.gz", np.zeros((20, 20, 24), np.float32), affine_from_spacing((1, 1, 1)))
    return mixed


# (case, library call, argv, the field the library names, the flag the CLI names instead)
CASES = [
    ("quality reference without labels",
     lambda p, t: QualityOptions(images=p, labels=p, reference_images=p, out=t),
     lambda p, t: ["evaluate", "quality", "--images", str(p), "--labels", str(p), "--reference-images", str(p),
                   "--out", str(t)],
     "reference_labels", "--reference-labels"),
    ("diversity shapes differ",
     lambda p, t: evaluate.diversity(DiversityOptions(data=_mismatched(t), out=t)),
     lambda p, t: ["evaluate", "diversity", "--data", str(_mismatched(t)), "--out", str(t)],
     "pass size X Y Z", "pass --size X Y Z"),
    ("segmenter out_path is a folder",
     lambda p, t: evaluate.train_segmenter(SegmenterOptions(out_path=t, steps=1, phantoms=1, size=(16, 16, 16))),
     lambda p, t: ["evaluate", "train-segmenter", "--out-path", str(t), "--steps", "1", "--phantoms", "1",
                   "--size", "16", "16", "16"],
     "(out_path)", "(--out-path)"),
    ("segmenter widths",
     lambda p, t: SegmenterOptions(out_path=t / "s.safetensors", channels=(8, 16, 0, 32)),
     lambda p, t: ["evaluate", "train-segmenter", "--out-path", str(t / "s.safetensors"), "--channels", "8", "16",
                   "0", "32"],
     "UNet's channels must be 4 positive widths", "UNet's --channels must be 4 positive widths"),
    ("fid device without a GPU",
     lambda p, t: FIDOptions(real=p, fake=p, out=t, device="cuda:99"),
     lambda p, t: ["evaluate", "fid", "--real", str(p), "--fake", str(p), "--device", "cuda:99", "--out", str(t)],
     "bad device: device 'cuda:99'", "bad --device: device 'cuda:99'"),
    ("reconstruction device name",
     lambda p, t: ReconstructionOptions(vae="x", data=p, device="bogus"),
     lambda p, t: ["evaluate", "reconstruction", "--vae", "x", "--data", str(p), "--device", "bogus", "--out", str(t)],
     "bad device: device 'bogus' is not one of cpu, cuda", "bad --device: device 'bogus'"),
    ("segmenter device",
     lambda p, t: SegmenterOptions(out_path=t / "s.safetensors", device="cuda:99"),
     lambda p, t: ["evaluate", "train-segmenter", "--out-path", str(t / "s.safetensors"), "--device", "cuda:99"],
     "bad device: device 'cuda:99'", "bad --device: device 'cuda:99'"),
    ("diversity max_pairs",
     lambda p, t: DiversityOptions(data=p, max_pairs=0),
     lambda p, t: ["evaluate", "diversity", "--data", str(p), "--max-pairs", "0", "--out", str(t)],
     "max_pairs must be an integer >= 1", "--max-pairs must be an integer >= 1"),
    ("fid cache is a file",
     lambda p, t: evaluate.fid(FIDOptions(real=p, fake=p, out=t / "rep", cache=p / "p0_image.nii.gz")),
     lambda p, t: ["evaluate", "fid", "--real", str(p), "--fake", str(p), "--cache", str(p / "p0_image.nii.gz"),
                   "--out", str(t / "rep")],
     "feature cache folder (cache)", "feature cache folder (--cache)"),
    ("fid center_fraction",
     lambda p, t: FIDSettings(center_fraction=0),
     lambda p, t: ["evaluate", "fid", "--real", str(p), "--fake", str(p), "--center-fraction", "0", "--out", str(t)],
     "center_fraction must be in (0, 1]", "--center-fraction must be in (0, 1]"),
]


@pytest.mark.parametrize("case, call, argv, field, flag", CASES, ids=[c[0] for c in CASES])
def test_library_errors_name_fields_and_the_cli_names_flags(phantoms, tmp_path, capsys, case, call, argv, field, flag):
    with pytest.raises(OptionError) as e:
        call(phantoms, tmp_path)
    assert field in str(e.value) and "--" not in str(e.value)
    assert main(argv(phantoms, tmp_path)) == 2
    err = capsys.readouterr().err
    assert flag in err and field not in err and "Traceback" not in err


def test_option_error_words_only_its_placeholders():
    e = OptionError("{size} for /data/size/{x}.nii: got {size}", "size")
    assert str(e) == "size for /data/size/{x}.nii: got size"
    assert e.worded({"size": "--size"}) == "--size for /data/size/{x}.nii: got --size"
    assert isinstance(e, ValueError) and e.fields == ("size",)


def test_unmatched_names_are_refused_not_paired_by_order(phantoms, tmp_path):
    # a_image has no a_label: pairing by sorted order would check a_image against b_label
    images, labels = tmp_path / "img", tmp_path / "lab"
    images.mkdir(), labels.mkdir()
    for src, dst in (("p0_image", images / "a_image"), ("p1_image", images / "b_image"),
                     ("p1_label", labels / "b_label"), ("p0_label", labels / "z_label")):
        (dst.parent / f"{dst.name}.nii.gz").write_bytes((phantoms / f"{src}.nii.gz").read_bytes())
    with pytest.raises(ValueError, match=r"1 image\(s\) have no label map of the same name .*\(a_image.nii.gz\)"):
        evaluate.quality(QualityOptions(images=images, labels=labels, out=tmp_path / "rep"))
    assert not (tmp_path / "rep" / "quality.json").exists()
    (labels / "z_label.nii.gz").rename(labels / "a_label.nii.gz")
    report = evaluate.quality(QualityOptions(images=images, labels=labels, out=tmp_path / "rep"))
    assert [(Path(v["image"]).name, Path(v["label"]).name) for v in report.data["volumes"]] == [
        ("a_image.nii.gz", "a_label.nii.gz"), ("b_image.nii.gz", "b_label.nii.gz")]


def test_an_empty_datalist_is_refused_before_any_work(phantoms, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text('{"training": []}')
    with pytest.raises(ValueError, match="'training' holds no entries"):
        evaluate.quality(QualityOptions(images=empty, labels=empty, out=tmp_path / "rep"))
    assert main(["evaluate", "reconstruction", "--vae", "x", "--data", str(empty), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "empty.json: 'training' holds no entries" in err and "Traceback" not in err
