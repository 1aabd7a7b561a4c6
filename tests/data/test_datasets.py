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
