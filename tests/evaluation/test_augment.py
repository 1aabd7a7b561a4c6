"""`maisi evaluate augment` on tiny phantoms: arms, leak checks, refused inputs, resume and the report."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from maisi.cli import main
from maisi.data.phantom import make_phantom, write_datalist, write_phantom
from maisi.evaluation.augment.data import build_arms, check_not_from_test, load_cases, load_synthetic
from maisi.evaluation.augment.options import AugmentOptions, SegmenterRecipe
from maisi.evaluation.augment.run import evaluate_augment, run_dir
from maisi.evaluation.augment.train import METRICS_FILE, train_run
from maisi.evaluation.errors import OptionError
from maisi.io.volume import read_volume, write_volume

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = SegmenterRecipe(features=8, patch=(16, 16, 16), batch=1, steps=2, checkpoint_every=1, log_every=1)
LABELS = (1, 3)  # liver, spleen


def _phantoms(folder, prefix, seeds, key):
    entries = [write_phantom(make_phantom("abdomen", size=32, spacing=8.0, seed=s), folder, f"{prefix}{s}")
               for s in seeds]
    return write_datalist(folder / f"{prefix}.json", entries, key)


def _fake_pair(folder, k, image, label, mask_file, shift=True):
    """A 'generated' pair as Pipeline.generate writes it: image, label and the record naming its mask file."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {"image": f"sample_seed{k}_image.nii.gz", "label": f"sample_seed{k}_label.nii.gz"}
    shutil.copy(image, folder / names["image"])
    vol = read_volume(label)  # shifted: new voxels, so the label is not a copy of its mask
    voxels = np.roll(np.asarray(vol.array), k + 1, axis=0) if shift else np.asarray(vol.array)
    write_volume(folder / names["label"], voxels, vol.affine, np.uint8)
    mask = None if mask_file is None else {"kind": "user", "file": str(mask_file)}
    record = {"seed": k, "mask": mask, "files": names}
    (folder / f"sample_seed{k}_record.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    train = _phantoms(root, "train", (0, 1), "training")
    test = _phantoms(root, "test", (90000, 90001), "testing")
    synth = root / "synthetic"
    for k in range(3):  # pair k from training mask k % 2
        s = k % 2
        _fake_pair(synth, k, root / f"train{s}_image.nii.gz", root / f"train{s}_label.nii.gz",
                   root / f"train{s}_label.nii.gz")
    return {"root": root, "train": train, "test": test, "synthetic": synth}


def _options(data, tmp_path, **kw):
    base = {"train": data["train"], "test": data["test"], "synthetic": data["synthetic"], "out": tmp_path / "out",
            "counts": (1, 3), "seeds": 1, "labels": LABELS, "recipe": TINY, "bootstrap": 100}
    return AugmentOptions(**(base | kw))


def test_arms_are_built_as_specified(data, tmp_path):
    o = _options(data, tmp_path, synthetic_only=True)
    real, test = load_cases(o.train, o.train_key, "train"), load_cases(o.test, o.test_key, "test")
    synthetic = load_synthetic(o.synthetic)
    arms = build_arms(o, real, synthetic)
    assert list(arms) == o.arm_names() == ["baseline", "real+1", "real+3", "synthetic"]
    assert [len(v) for v in arms.values()] == [2, 3, 5, 3]
    assert arms["real+3"][:2] == real and arms["real+3"][2:] == synthetic and arms["synthetic"] == synthetic
    test_files = {c.image for c in test} | {c.label for c in test}
    train_labels = {c.label for c in real}
    for cases in arms.values():  # no test case in any arm; every synthetic pair from a training mask
        assert not test_files & {f for c in cases for f in (c.image, c.label)}
        assert all(c.mask_file is None or c.mask_file.resolve() in train_labels for c in cases)
    with pytest.raises(OptionError, match="asks for 4 synthetic pairs but synthetic has 3"):
        build_arms(replace(o, counts=(4,)), real, synthetic)


def test_synthetic_pairs_from_test_masks_are_refused(data, tmp_path):
    test = load_cases(data["test"], None, "test")
    bad = tmp_path / "bad"
    _fake_pair(bad, 0, test[0].image, test[0].label, test[0].label)  # the record names a test mask
    with pytest.raises(OptionError, match="generated from a test mask"):
        check_not_from_test(load_synthetic(bad), test)
    copy = tmp_path / "copy.nii.gz"  # by content: the same mask under another name
    shutil.copy(test[1].label, copy)
    _fake_pair(bad, 0, test[0].image, test[0].label, copy)
    with pytest.raises(OptionError, match="generated from a test mask"):
        check_not_from_test(load_synthetic(bad), test)
    with pytest.raises(OptionError, match="generated from a test mask"):
        evaluate_augment(_options(data, tmp_path, synthetic=bad, counts=(1,)))
    _fake_pair(bad, 0, test[0].image, test[1].label, None, shift=False)  # no mask file named: by its label voxels
    with pytest.raises(OptionError, match="generated from a test mask"):
        check_not_from_test(load_synthetic(bad), test)
    assert not (tmp_path / "out").exists()  # refused before any compute


def _empty(data, tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"training": []}))
    return {"train": path}


def _same_file(data, tmp_path):
    return {"test": data["train"], "test_key": "training"}


def _same_content(data, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("train0_image.nii.gz", "train0_label.nii.gz"):
        shutil.copy(data["root"] / name, copy / name.replace("train0", "other"))
    return {"test": copy}


def _extra_test_label(data, tmp_path):
    return {"labels": (1, 3, 26)}  # hepatic tumour: in no mask


def _vocabulary(data, tmp_path):
    folder = tmp_path / "vocab"
    write_phantom(make_phantom("abdomen", size=32, spacing=8.0, seed=5, tumors=["hepatic_tumor"]), folder, "t")
    return {"test": folder, "labels": None}


@pytest.mark.parametrize("change, message", [
    (_empty, r"train: .*empty.json: 'training' holds no entries"),
    (_same_file, "are the same image file: the test set must be held out from train"),
    (_same_content, r"the same image content \(sha256\)"),
    (_extra_test_label, r"mismatched label vocabularies: no training mask holds 26 \(hepatic tumor\)"),
    (_vocabulary, r"mismatched label vocabularies: the test masks hold 26 \(hepatic tumor\)"),
])
def test_bad_inputs_are_refused_before_any_compute(data, tmp_path, change, message):
    with pytest.raises(OptionError, match=message):
        evaluate_augment(_options(data, tmp_path, **change(data, tmp_path)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw, message", [
    ({"model": "demo"}, "give model .* or synthetic .*, not both"),
    ({"synthetic": None}, "the synthetic arms need pairs"),
    ({"counts": (0, 2)}, "counts must be distinct positive"),
    ({"tumors": ("hepatic_tumor",)}, "tumors are given with source 'tumor'"),
    ({"seeds": 0}, "seeds must be >= 1"),
])
def test_bad_options_name_their_field(data, tmp_path, kw, message):
    with pytest.raises(OptionError, match=message):
        _options(data, tmp_path, **kw)


def test_bad_recipe_names_its_field():
    with pytest.raises(OptionError, match="recipe.features: SegResNet's group norm needs a multiple of 8"):
        SegmenterRecipe(features=4)
    with pytest.raises(OptionError, match="recipe.patch needs 3 multiples of 16"):
        SegmenterRecipe(patch=(24, 32, 32))


def test_cli_names_flags(data, tmp_path, capsys):
    assert main(["evaluate", "augment", "--train", str(data["train"]), "--test", str(data["test"]), "--model", "demo",
                 "--tumor", "hepatic_tumor", "--out", str(tmp_path / "o")]) != 0
    assert "--tumor are given with --source 'tumor'" in capsys.readouterr().err
    assert main(["evaluate", "augment", "--test", str(data["test"])]) != 0
    assert "give --train and --test" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_interrupted_run_resumes_to_the_uninterrupted_result(data, tmp_path):
    cases = load_cases(data["train"], "training", "train")
    recipe = replace(TINY, steps=5, checkpoint_every=2)
    sig = {"test": "resume"}
    whole = train_run(tmp_path / "whole", cases, LABELS, recipe, 3, sig)

    def stop(step):
        if step == 3:  # after the checkpoint of step 2 and the metrics of step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(tmp_path / "cut", cases, LABELS, recipe, 3, sig, on_step=stop)
    lines = []
    resumed = train_run(tmp_path / "cut", cases, LABELS, recipe, 3, sig, log=lines.append)
    assert lines[0] == "cut: resuming at step 2/5"
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "cut" / METRICS_FILE).read_text() == (tmp_path / "whole" / METRICS_FILE).read_text()
    with pytest.raises(ValueError, match="holds a run with other settings"):
        train_run(tmp_path / "cut", cases, LABELS, recipe, 4, {"test": "other"})


def test_report_and_rerun_skips_finished_runs(data, tmp_path):
    o = _options(data, tmp_path, counts=(1,), seeds=2)
    report = evaluate_augment(o)
    out = tmp_path / "out"
    assert {p.name for p in report.files} == {"augment.json", "augment.md", "augment_dice.png",
                                              "augment_learning_curves.png"}
    res = json.loads((out / "augment.json").read_text())
    assert list(res["arms"]) == ["baseline", "real+1"] and res["classes"] == ["liver", "spleen"]
    arm = res["arms"]["real+1"]
    assert (arm["n_real"], arm["n_synthetic"]) == (2, 1)
    assert np.asarray(arm["dice_per_run"]).shape == (2, 2, 2)  # seeds × test cases × classes
    for cls in ("liver", "spleen", "mean"):
        s = arm["dice"][cls]
        assert s["ci"][0] <= s["mean"] <= s["ci"][1] and "mean" in arm["dice_vs_baseline"][cls]
    assert "Dice: arm − baseline" in (out / "augment.md").read_text()
    done = run_dir(out, "real+1", 1) / "result.json"
    stamp = done.stat().st_mtime_ns
    again = evaluate_augment(o)
    assert done.stat().st_mtime_ns == stamp and again.data["arms"] == report.data["arms"]


def test_phantoms_benchmark_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["evaluate", "augment", "--phantoms", "--phantoms-train", "2", "--phantoms-test", "2", "--counts", "1",
            "--seeds", "1", "--steps", "2", "--generation-steps", "2", "--bootstrap", "100", "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    assert "baseline mean Dice" in capsys.readouterr().out
    res = json.loads((out / "augment.json").read_text())
    assert res["synthetic_source"] == "masks via demo" and res["arms"]["real+1"]["n_synthetic"] == 1
    record = json.loads(next((out / "synthetic").glob("*_record.json")).read_text())
    assert record["mask"]["file"].endswith("phantoms/real000_label.nii.gz")  # a training mask
