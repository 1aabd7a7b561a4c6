"""Post-processing (clip, HU, air outside the body), the quality check on phantoms, and sample records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maisi.io.jsondata import jsonable
from maisi.pipeline.postprocess import check_quality, to_hu, to_int16
from maisi.pipeline.record import write_record


def test_to_hu_clips_rescales_and_sets_air_outside_body():
    x = np.array([-0.5, 0.0, 0.5, 1.0, 1.5], np.float32).reshape(5, 1, 1)
    np.testing.assert_allclose(to_hu(x)[:, 0, 0], [-1000, -1000, 0, 1000, 1000])
    mask = np.array([0, 1, 200, 1, 0]).reshape(5, 1, 1)
    np.testing.assert_allclose(to_hu(x, mask)[:, 0, 0], [-1000, -1000, 0, 1000, -1000])
    assert to_int16(np.array([-1500.4, 12.6, 3000.0])).tolist() == [-1000, 13, 1000]
    with pytest.raises(ValueError, match="mask shape"):
        to_hu(x, np.zeros((4, 1, 1)))


def test_quality_check_passes_on_phantom_and_fails_on_corrupted():
    from maisi.data.phantom import make_phantom

    ph = make_phantom("abdomen", size=48, spacing=6.0, seed=2)
    good = check_quality(np.clip(ph.image, -1000, 1000), ph.label)
    assert good["passed"] is True
    corrupted = np.clip(ph.image, -1000, 1000).copy()
    corrupted[ph.label == 1] = -900.0  # liver as dark as lung
    bad = check_quality(corrupted, ph.label)
    assert bad["passed"] is False and "liver" in json.dumps(bad)
    assert check_quality(ph.image, None)["passed"] is None


def test_record_is_json_and_written_atomically(tmp_path):
    rec = jsonable({"a": (1, 2), "b": np.float32(1.5), "c": frozenset({3, 1}), "d": tmp_path, "e": np.eye(2)})
    assert rec == {"a": [1, 2], "b": 1.5, "c": [1, 3], "d": str(tmp_path), "e": [[1.0, 0.0], [0.0, 1.0]]}
    path = write_record(tmp_path / "r.json", rec)
    assert json.loads(path.read_text()) == rec and not list(tmp_path.glob("*.tmp*"))
