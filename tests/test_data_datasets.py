"""Datasets: VAE patches, cached latents (mean or sampled) with conditions, latent+mask pairs, clear errors."""

import json

import numpy as np
import pytest
import torch

from data_helpers import PoolEncoder
from maisi.data.datasets import Augment, LatentDataset, load_datalist, vae_patch_dataset
from maisi.data.phantom import make_phantom, write_phantom
from maisi.data.prepare import PrepareConfig, prepare_all, save_latents


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    for s, region in enumerate(["chest", "abdomen"]):
        write_phantom(make_phantom(region, (36, 36, 28), 8.0, seed=s), root / "in", f"c{s}")
    prepare_all(root / "in", root / "out", PrepareConfig(multiple_of=16), PoolEncoder(), "pool", log=lambda s: None)
    return root


def test_vae_patches_are_in_unit_range_and_deterministic(prepared):
    entries = [{"image": str(p)} for p in sorted((prepared / "in").glob("*_image.nii.gz"))]
    aug = Augment(flip_prob=0.5, affine_prob=0.5, intensity_prob=0.5)
    a = vae_patch_dataset(entries, (16, 16, 16), aug, seed=3)
    b = vae_patch_dataset(entries, (16, 16, 16), aug, seed=3)
    xa, xb = a[0]["image"], b[0]["image"]
    assert xa.shape == (1, 16, 16, 16) and xa.dtype == torch.float32
    torch.testing.assert_close(xa, xb)
    plain = vae_patch_dataset(entries, (48, 48, 32), seed=0)[1]["image"]  # larger than the image: padded
    assert plain.shape == (1, 48, 48, 32) and 0.0 <= float(plain.min()) and float(plain.max()) <= 1.0
    assert float(plain.max()) > 0.5  # bone/contrast present


def test_latent_dataset_mean_sample_conditions_and_masks(prepared):
    entries = load_datalist(prepared / "out" / "datalist.json")
    ds = LatentDataset(entries, sample="mean", with_mask=True)
    item = ds[0]
    assert item["latent"].shape == (4, 8, 8, 8) and item["mask"].shape == (1, 32, 32, 32)
    assert item["spacing"].tolist() == pytest.approx([9.0, 9.0, 7.0])
    assert item["top_region_index"].tolist() == [0, 1, 0, 0] and int(item["modality"]) == 1
    sampled = LatentDataset(entries, sample="sample", seed=1)
    s1, s2 = sampled[0]["latent"], sampled[0]["latent"]
    torch.testing.assert_close(s1, s2)  # same (seed, epoch, index): same draw
    assert not torch.equal(s1, item["latent"])
    sampled.set_epoch(1)
    assert not torch.equal(sampled[0]["latent"], s1)


def test_clear_errors(prepared, tmp_path):
    entries = load_datalist(prepared / "out" / "datalist.json")
    with pytest.raises(ValueError, match="no entries"):
        LatentDataset([])
    with pytest.raises(FileNotFoundError, match="missing files"):
        LatentDataset([{**entries[0], "image": str(tmp_path / "nope.safetensors")}])
    no_spacing = {k: v for k, v in entries[0].items() if k != "spacing"}
    with pytest.raises(ValueError, match="has no 'spacing'"):
        LatentDataset([no_spacing])
    save_latents(tmp_path / "c8.safetensors", torch.zeros(8, 4, 4, 4), torch.ones(8, 4, 4, 4))
    with pytest.raises(ValueError, match="expected 4"):
        LatentDataset([{**entries[0], "image": str(tmp_path / "c8.safetensors")}])[0]
    save_latents(tmp_path / "small.safetensors", torch.zeros(4, 4, 4, 4), torch.ones(4, 4, 4, 4))
    with pytest.raises(ValueError, match="does not match latents"):
        LatentDataset([{**entries[0], "image": str(tmp_path / "small.safetensors")}], with_mask=True)[0]
    (tmp_path / "empty.json").write_text(json.dumps({"training": []}))
    with pytest.raises(ValueError, match="no entries"):
        load_datalist(tmp_path / "empty.json")
    with pytest.raises(ValueError, match="multiples of 4"):
        vae_patch_dataset(entries, (10, 16, 16))


def test_reads_reference_nifti_latents(prepared, tmp_path):
    import nibabel as nib

    entry = load_datalist(prepared / "out" / "datalist.json")[0]
    mu = np.arange(4 * 2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5, 4)  # reference layout X×Y×Z×C
    nib.save(nib.Nifti1Image(mu, np.eye(4)), str(tmp_path / "emb.nii.gz"))
    item = LatentDataset([{**entry, "image": str(tmp_path / "emb.nii.gz")}])[0]
    assert item["latent"].shape == (4, 2, 3, 5)
    assert float(item["latent"][1, 0, 0, 1]) == mu[0, 0, 1, 1]
    with pytest.raises(ValueError, match="no σ"):
        LatentDataset([{**entry, "image": str(tmp_path / "emb.nii.gz")}], sample="sample")[0]
