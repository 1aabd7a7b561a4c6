"""Training data: image patches (with augmentation presets), cached latents with conditions, clear errors."""

import itertools
import json

import numpy as np
import pytest
import torch

from data_helpers import PoolEncoder
from maisi.data.augment import AUGMENTS, Augment
from maisi.data.datalist import read_datalist
from maisi.data.datasets import ImagePatches, LatentCases
from maisi.data.phantom import make_phantom, write_phantom
from maisi.data.prepare import PrepareConfig, prepare_all, save_latents


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    for s, region in enumerate(["chest", "abdomen"]):
        write_phantom(make_phantom(region, (36, 36, 28), 8.0, seed=s), root / "in", f"c{s}")
    prepare_all(root / "in", root / "out", PrepareConfig(multiple_of=16), PoolEncoder(), "pool", log=lambda s: None)
    return root


@pytest.fixture(scope="module")
def images(prepared):
    return [{"image": str(p), "_where": p.name} for p in sorted((prepared / "in").glob("*_image.nii.gz"))]


def patch(source: ImagePatches, item: int, seed: int) -> torch.Tensor:
    return source.load(item, torch.Generator().manual_seed(seed))["image"]


def test_image_patches_are_in_unit_range_and_padded(images):
    x = patch(ImagePatches(images, [(0, 16)]), 0, 0)
    assert x.shape == (1, 16, 16, 16) and x.dtype == torch.float32
    big = patch(ImagePatches(images, [(0, 48)]), 1, 0)  # larger than the 36×36×28 image: zero-padded
    assert big.shape == (1, 48, 48, 48) and 0.0 <= float(big.min()) and float(big.max()) <= 1.0
    assert float(big.max()) > 0.5 and float(big[..., 28:].abs().max()) == 0.0  # bone present; padding is air


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_augmented_patches_are_reproducible_in_range_and_keep_the_crop(images, name):
    """Each preset: the same generator gives the same patch; "none" is the plain patch; the others change some
    patches, and "flip" only flips the plain crop (the augmentation draws after the crop)."""
    plain, aug = ImagePatches(images, [(0, 16)]), ImagePatches(images, [(0, 16)], augment=AUGMENTS[name])
    changed = 0
    for seed in range(6):
        x, y = patch(plain, 0, seed), patch(aug, 0, seed)
        assert torch.equal(y, patch(aug, 0, seed)) and type(y) is torch.Tensor and y.dtype == torch.float32
        assert y.shape == x.shape and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
        changed += not torch.equal(x, y)
        if name == "flip":
            flips = [a for r in range(4) for a in itertools.combinations((1, 2, 3), r)]
            assert any(torch.equal(torch.flip(x, a), y) for a in flips)
    assert changed == 0 if name == "none" else changed >= 3


def test_augment_values_are_checked():
    with pytest.raises(ValueError, match="flip_prob must be in"):
        Augment(flip_prob=1.5)
    assert not AUGMENTS["none"].active and AUGMENTS["standard"].active


def test_latent_cases_mean_sample_conditions_and_labels(prepared):
    entries = read_datalist(prepared / "out" / "datalist.json")
    item = LatentCases(entries, 4, with_label=True).load(0, torch.Generator())
    assert item["latent"].shape == (4, 8, 8, 8) and item["label"].shape == (1, 32, 32, 32)
    assert item["spacing"].tolist() == pytest.approx([9.0, 9.0, 7.0])
    assert item["top_region_index"].tolist() == [0, 1, 0, 0] and int(item["modality"]) == 1
    sampled = LatentCases(entries, 4, use="sample")
    s1 = sampled.load(0, torch.Generator().manual_seed(1))["latent"]
    torch.testing.assert_close(s1, sampled.load(0, torch.Generator().manual_seed(1))["latent"])  # same draw
    assert not torch.equal(s1, item["latent"])
    assert not torch.equal(sampled.load(0, torch.Generator().manual_seed(2))["latent"], s1)


def test_clear_errors(prepared, tmp_path):
    entries = read_datalist(prepared / "out" / "datalist.json")
    with pytest.raises(FileNotFoundError, match="missing file"):
        LatentCases([{**entries[0], "latent": str(tmp_path / "nope.safetensors")}], 4)
    save_latents(tmp_path / "c8.safetensors", torch.zeros(8, 4, 4, 4), torch.ones(8, 4, 4, 4))
    with pytest.raises(ValueError, match="bare: no 'spacing'"):  # neither in the entry nor in a sidecar
        LatentCases([{"latent": str(tmp_path / "c8.safetensors"), "_where": "bare"}], 4)
    with pytest.raises(ValueError, match="latent_channels = 4"):
        LatentCases([{**entries[0], "latent": str(tmp_path / "c8.safetensors")}], 4).load(0, torch.Generator())
    save_latents(tmp_path / "small.safetensors", torch.zeros(4, 4, 4, 4), torch.ones(4, 4, 4, 4))
    with pytest.raises(ValueError, match="is not 4× the latent's"):
        LatentCases([{**entries[0], "latent": str(tmp_path / "small.safetensors")}], 4,
                    with_label=True).load(0, torch.Generator())
    (tmp_path / "empty.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="no entries"):
        read_datalist(tmp_path / "empty.json")
    with pytest.raises(ValueError, match="patch curriculum"):
        ImagePatches(entries, [(5, 16)])


def test_reads_reference_nifti_latents(prepared, tmp_path):
    import nibabel as nib

    entry = read_datalist(prepared / "out" / "datalist.json")[0]
    mu = np.arange(4 * 2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5, 4)  # reference layout X×Y×Z×C
    nib.save(nib.Nifti1Image(mu, np.eye(4)), str(tmp_path / "emb.nii.gz"))
    latent = LatentCases([{**entry, "latent": str(tmp_path / "emb.nii.gz")}], 4).load(0, torch.Generator())["latent"]
    assert latent.shape == (4, 2, 3, 5)
    assert float(latent[1, 0, 0, 1]) == mu[0, 0, 1, 1]
    with pytest.raises(ValueError, match="needs a 'sigma'"):
        LatentCases([{**entry, "latent": str(tmp_path / "emb.nii.gz")}], 4, use="sample").load(0, torch.Generator())


@pytest.mark.parametrize("name", ["noise.safetensors", "noise_emb.nii.gz", "noise.nii"])
def test_a_latent_file_that_is_not_one_is_a_clear_error(tmp_path, name):
    """Regression: random bytes named .nii.gz gave nibabel's ImageFileError traceback. Reading the file whole or
    its header alone, the error names the file and what a latent file is."""
    from maisi.data.datasets import latent_header, read_latent_file

    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    for read in (read_latent_file, latent_header):
        with pytest.raises(ValueError, match="cannot read latents") as e:
            read(path)
        assert str(path) in str(e.value) and "expected a .safetensors file with a 'mu' tensor" in str(e.value)


def test_latent_header_matches_the_file_without_reading_it(prepared, tmp_path):
    import nibabel as nib

    from maisi.data.datasets import latent_header, read_latent_file

    latent = read_datalist(prepared / "out" / "datalist.json")[0]["image"]  # `maisi prepare` names it "image"
    mu, sigma = read_latent_file(latent)
    assert latent_header(latent) == (tuple(mu.shape), sigma is not None)
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 5, 4), np.float32), np.eye(4)), str(tmp_path / "emb.nii.gz"))
    assert latent_header(tmp_path / "emb.nii.gz") == ((4, 2, 3, 5), False)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "image.nii.gz"))
    with pytest.raises(ValueError, match="a NIfTI latent must be X×Y×Z×C .* an image rather than its latent"):
        latent_header(tmp_path / "image.nii.gz")


def test_latent_cases_check_every_file_when_made(prepared, tmp_path):
    """Latent headers and label maps are checked when the cases are made, before any work: all refused files at
    once, each with its entry."""
    from maisi.io.volume import affine_from_spacing, write_volume

    entries = read_datalist(prepared / "out" / "datalist.json")
    save_latents(tmp_path / "c8.safetensors", torch.zeros(8, 8, 8, 8), torch.ones(8, 8, 8, 8))
    fractional = np.zeros((32, 32, 32), np.float32)
    fractional[0, 0, 0] = 0.5
    write_volume(tmp_path / "half.nii.gz", fractional, affine_from_spacing(8.0), np.float32)
    bad = [{**entries[0], "latent": str(tmp_path / "c8.safetensors"), "_where": "entry A"},
           {**entries[1], "label": str(tmp_path / "half.nii.gz"), "_where": "entry B"}]
    with pytest.raises(ValueError, match="2 training file") as e:
        LatentCases(bad, 4, with_label=True)
    assert "entry A: " in str(e.value) and "latent_channels = 4" in str(e.value)
    assert "entry B: " in str(e.value) and "half.nii.gz: a label map must hold integer ids" in str(e.value)
    LatentCases(bad[1:], 4)  # without labels the label map is not read


@pytest.mark.parametrize("top, bottom", [("abdomen", "chest"), (3, 0), ([0, 0, 1, 0], [0, 1, 0, 0])])
def test_a_body_region_span_that_goes_upwards_is_refused(top, bottom):
    """Regression: training took top_region_index 'abdomen' with bottom_region_index 'chest', which the generator
    refuses (maisi.data.regions.parse_span)."""
    from maisi.data.datasets import conditions

    meta = {"spacing": [1.0, 1.0, 1.0], "top_region_index": top, "bottom_region_index": bottom}
    with pytest.raises(ValueError, match="^case 7: top_region_index .* goes upwards; write the top region first"):
        conditions(meta, "case 7")
    assert conditions({**meta, "top_region_index": bottom, "bottom_region_index": top}, "case 7")


def test_read_label_map_takes_maisi_ids_only(tmp_path):
    from maisi.data.datasets import read_label_map
    from maisi.io.volume import affine_from_spacing, write_volume

    ids = np.zeros((8, 8, 8), np.uint8)
    ids[1:3, 1:3, 1:3], ids[4, 4, 4] = 1, 200  # liver, body
    write_volume(tmp_path / "ok.nii.gz", ids, affine_from_spacing(2.0), np.uint8)
    label = read_label_map(tmp_path / "ok.nii.gz")
    assert label.shape == (1, 8, 8, 8) and label.dtype == torch.int64 and sorted(label.unique().tolist()) == [0, 1, 200]
    ids[0, 0, 0] = 16  # a placeholder id: no class
    write_volume(tmp_path / "bad.nii.gz", ids, affine_from_spacing(2.0), np.uint8)
    with pytest.raises(ValueError, match=r"bad.nii.gz: label ids \[16\] are not in the MAISI vocabulary"):
        read_label_map(tmp_path / "bad.nii.gz")


def test_patch_edges_fit_the_autoencoder_and_the_volumes(images):
    """A patch is a multiple of the autoencoder's factor; larger than a volume it is padded (the 36×36×28 images
    take 32 and 36), but one larger than every volume's longest edge is refused."""
    from maisi.data.datasets import check_patches

    check_patches(images, [16, 32, 36], 4)
    with pytest.raises(ValueError, match=r"^patch 18 must be a positive multiple of 4 .* e\.g\. 16 or 20"):
        check_patches(images, [16, 18], 4)
    with pytest.raises(ValueError, match="^patch 40 is larger than every training volume .* at most 36"):
        check_patches(images, [40], 4)
