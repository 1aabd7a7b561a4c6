"""Mask sources: resampling keeps ids and geometry, body envelope added, database ranking (ours and NVIDIA's
released database), tumour inpainting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_helpers import organ_blocks
from maisi.data.labelmap import ensure_body
from maisi.io.volume import affine_from_spacing, spacing_from_affine, write_volume
from maisi.pipeline import masks as M
from pipeline_support import RELEASED, block_label, make_released_db


def test_user_mask_without_body_gets_one(tmp_path):
    lab = np.zeros((24, 24, 24), np.uint8)
    lab[4:20, 4:20, 2:22] = 63  # a ring of "rib" around ...
    lab[6:18, 6:18, 2:22] = 0
    lab[9:15, 9:15, 6:18] = 1  # ... a liver, with a gap between them
    write_volume(tmp_path / "m.nii.gz", lab, affine_from_spacing(2.0), np.uint8)
    label, aff, info = M.load_user_mask(tmp_path / "m.nii.gz")
    assert info["body_added"] is True
    assert label[7, 7, 10] == 200  # the gap inside the ring is body
    assert label[0, 0, 0] == 0 and label[12, 12, 10] == 1 and label[4, 10, 10] == 63
    with_body, added = ensure_body(label)
    assert not added and np.array_equal(with_body, label)


def test_user_mask_mapping_and_unknown_ids(tmp_path):
    lab = np.zeros((16, 16, 16), np.uint8)
    lab[4:12, 4:12, 4:12] = 2  # placeholder id 2: not in the vocabulary
    write_volume(tmp_path / "m.nii.gz", lab, affine_from_spacing(2.0), np.uint8)
    with pytest.raises(ValueError, match=r"ids \[2\] are not in the MAISI vocabulary"):
        M.load_user_mask(tmp_path / "m.nii.gz")
    (tmp_path / "map.json").write_text(json.dumps({"2": "liver"}))
    label, _, info = M.load_user_mask(tmp_path / "m.nii.gz", tmp_path / "map.json")
    assert set(np.unique(label)) == {0, 1} and "all 1 source labels mapped" in info["conversion"]


def test_database_ranking_and_missing_anatomy(tmp_path):
    entries = [
        M.Entry("a.nii.gz", (64, 64, 64), (4.0, 4.0, 4.0), 1, 1, frozenset({28, 200})),
        M.Entry("b.nii.gz", (128, 128, 128), (1.0, 1.0, 1.0), 1, 1, frozenset({28, 200})),
        M.Entry("c.nii.gz", (64, 64, 64), (4.0, 4.0, 4.0), 2, 2, frozenset({1, 3, 200})),
    ]
    ranked = M.rank_entries(entries, (32, 32, 32), (8.0, 8.0, 8.0), (1, 1), ())
    assert [e.file for e in ranked] == ["a.nii.gz", "b.nii.gz"]  # same 256 mm field of view first
    assert [e.file for e in M.rank_entries(entries, (128,) * 3, (1.0,) * 3, None, (1,))] == ["c.nii.gz"]
    assert M.rank_entries(entries, (64,) * 3, (4.0,) * 3, (1, 1), (1,)) == []
    assert "no mask in the database shows chest with liver" in M.describe_missing(entries, (1, 1), (1,))
    M.write_index(tmp_path, entries)
    assert M.read_index(tmp_path) == entries
    (tmp_path / "index.json").write_text('{"masks": [{"file": "x"}]}')
    with pytest.raises(ValueError, match="not a mask index"):
        M.read_index(tmp_path)
    with pytest.raises(FileNotFoundError, match="no mask database"):
        M.read_index(tmp_path / "nowhere")


def test_phantom_database_serves_requested_region(tmp_path):
    folder = M.phantom_database(tmp_path / "db", [(2, 2)], variants=1, size=32, spacing=8.0)
    assert len(M.read_index(folder)) == 1
    assert M.phantom_database(tmp_path / "db", [(1, 1), (2, 2)], variants=1, size=32, spacing=8.0) == folder
    assert sorted(e.top_region_index for e in M.read_index(folder)) == [1, 2]  # chest added, abdomen kept
    mask = M.database_mask(folder, (32, 32, 32), (6.0, 6.0, 6.0), (2, 2), (1,))
    assert mask.label.shape == (32, 32, 32) and (mask.label == 1).any() and mask.source["file"].startswith("abdomen")
    assert spacing_from_affine(mask.affine) == pytest.approx((6.0, 6.0, 6.0))
    with pytest.raises(ValueError, match=r"shows head_neck with liver; the database has regions: chest, abdomen"):
        M.database_mask(folder, (32,) * 3, (6.0,) * 3, (0, 0), (1,))


def test_insert_tumour_inside_host():
    lab = organ_blocks((32, 32, 32))
    lab[lab == 26] = 1
    out = M.insert_tumor(lab, 26, (2.0, 2.0, 2.0), np.random.default_rng(0))
    tumour = out == 26
    assert tumour.sum() > 10 and np.all(lab[tumour] == 1)
    assert np.array_equal(out[~tumour], lab[~tumour])
    again = M.insert_tumor(lab, 26, (2.0, 2.0, 2.0), np.random.default_rng(0))
    assert np.array_equal(out, again)
    with pytest.raises(ValueError, match="no pancreas to hold a pancreatic tumor"):
        M.insert_tumor(lab, 24, (2.0, 2.0, 2.0), np.random.default_rng(0))


def test_released_ranking_follows_the_reference(tmp_path):
    """scripts/find_masks.py + LDMSampler.find_closest_masks: the regions inside the mask's span, every organ, no
    tumour not asked for, then Σ |fov − FOV|/10 + |dim − size|/100 + |spacing − s| (field of view dominates)."""
    db = M.open_database(make_released_db(tmp_path))
    assert db.kind == "released" and db.folder is None and len(db.entries) == 5

    def files(size, spacing, regions, anatomy):
        return [e.file.split("/")[0] for e in db.rank((size,) * 3, (spacing,) * 3, regions, anatomy)]

    # a: exact (score 0); d: same 256 mm field of view, 4 mm (12.96); b: the requested 8 mm but 128 mm (38.88);
    # c has a tumour that was not asked for; e has no liver
    assert files(32, 8.0, (2, 2), (1,)) == ["a", "d", "b"]
    assert files(32, 8.0, (2, 2), (1, 26)) == ["c"]  # the tumour asked for
    assert files(32, 8.0, (1, 1), ()) == ["a", "e"]  # a chest-abdomen mask shows the chest; ties keep file order
    assert files(32, 8.0, (1, 2), ()) == ["a"]  # a span needs both regions
    assert files(160, 1.6, None, (1,)) == ["d"]  # a and b are 128 voxels or more smaller than 160: skipped
    assert files(32, 8.0, (0, 0), ()) == []


def test_released_database_zip_extracted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAISI_CACHE", str(tmp_path / "cache"))
    datasets = make_released_db(tmp_path / "zip")
    index = datasets / f"candidate_masks_{RELEASED}.json"
    got = [M.database_mask(index, (32,) * 3, (8.0,) * 3, (2, 2), (1,), attempt) for attempt in range(4)]
    assert [m.source["file"] for m in got] == [f"{n}/pseudo_label.nii.gz" for n in "adba"]  # wraps around
    assert got[0].source["format"] == "released" and got[0].source["candidates"] == 3
    assert (got[0].label == 1).any() and spacing_from_affine(got[0].affine) == pytest.approx((8.0,) * 3)
    cached = list((tmp_path / "cache").rglob("pseudo_label.nii.gz"))
    assert len(cached) == 3 and all(f"all_masks_{RELEASED}" in str(p) for p in cached)
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    M.database_mask(datasets, (32,) * 3, (8.0,) * 3, (2, 2), (1,), 1)  # the folder names the same database
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # not extracted again
    # the extracted folder gives the same masks, without the cache
    folder = make_released_db(tmp_path / "folder", zipped=False)
    same = M.database_mask(folder / f"all_masks_{RELEASED}", (32,) * 3, (8.0,) * 3, (2, 2), (1,), 0)
    assert same.source["file"] == got[0].source["file"] and np.array_equal(same.label, got[0].label)
    (datasets / f"all_masks_{RELEASED}.zip").unlink()
    with pytest.raises(FileNotFoundError, match="label maps of .* are missing"):
        M.open_database(index)
    with pytest.raises(FileNotFoundError, match="no mask database"):
        M.open_database(tmp_path / "nowhere")


def test_database_skips_masks_that_lose_the_anatomy_when_resampled(tmp_path):
    """A small field of view around the centre keeps the centred liver only (the reference skips the others)."""
    for name, centred in (("a_side.nii.gz", False), ("b_centre.nii.gz", True)):
        write_volume(tmp_path / name, block_label(32, (1,), centred), affine_from_spacing(8.0), np.uint8)
    M.write_index(tmp_path, [M.Entry(n, (32,) * 3, (8.0,) * 3, 2, 2, frozenset({1, 200}))
                             for n in ("a_side.nii.gz", "b_centre.nii.gz")])
    for attempt in range(2):
        m = M.database_mask(tmp_path, (32,) * 3, (2.0,) * 3, (2, 2), (1,), attempt)
        assert m.source["file"] == "b_centre.nii.gz" and m.source["rank"] == 1 and (m.label == 1).any()
    assert M.database_mask(tmp_path, (32,) * 3, (2.0,) * 3, (2, 2), (), 0).source["file"] == "a_side.nii.gz"
    M.write_index(tmp_path, [M.Entry("a_side.nii.gz", (32,) * 3, (8.0,) * 3, 2, 2, frozenset({1, 200}))])
    with pytest.raises(ValueError, match="loses one of the organs"):
        M.database_mask(tmp_path, (32,) * 3, (2.0,) * 3, (2, 2), (1,), 0)
