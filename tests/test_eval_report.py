"""Report writing: PNG charts (Pillow), Markdown tables, JSON with NaN → null; independent Fréchet check."""

import json

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from maisi.evaluation import plots
from maisi.evaluation.fid import frechet_distance
from maisi.evaluation.report import Report, markdown_table


def test_bar_chart_draws_bars_proportional_to_values(tmp_path):
    path = plots.bar_chart({"xy": 1.0, "yz": 2.0, "zx": 4.0}, tmp_path / "fid.png", "FID", y_max=4.0)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (400, 640, 3)
    heights = []
    for color in plots.COLORS[:3]:
        rows = np.where((img == np.array(color)).all(-1).any(1))[0]
        heights.append(rows.max() - rows.min() + 1)
    assert heights[0] < heights[1] < heights[2]
    assert abs(heights[2] / heights[0] - 4) < 0.2


@pytest.mark.parametrize("values, path, match", [
    ({}, "a.png", "at least one"),
    ({"a": -1.0}, "a.png", ">= 0"),
    ({"a": 1.0}, "a.jpg", "PNG"),
])
def test_bar_chart_rejects_bad_input(tmp_path, values, path, match):
    with pytest.raises(ValueError, match=match):
        plots.bar_chart(values, tmp_path / path, "t")
    assert not (tmp_path / path).exists()


def test_histogram_overlay_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    path = plots.histogram_overlay({"real": rng.normal(50, 10, 500), "synthetic": rng.normal(80, 10, 500)},
                                   tmp_path / "h.png", "liver HU", value_range=(0, 150))
    img = np.asarray(Image.open(path).convert("RGB"))
    for color in plots.COLORS[:2]:
        assert (img == np.array(color)).all(-1).sum() > 50
    with pytest.raises(ValueError, match="non-empty"):
        plots.histogram_overlay({"real": []}, tmp_path / "e.png", "t")


def test_report_writes_json_markdown_and_plots(tmp_path):
    r = Report(tmp_path / "out", "fid", "2.5D FID")
    r.set("fid", {"xy": 1.5, "yz": float("nan"), "mean": np.float32(2.0)})
    r.table("Per plane", [{"plane": "xy", "fid": 1.5}, {"plane": "yz", "fid": float("nan")}])
    r.bar_chart("planes", {"xy": 1.5, "yz": 2.5}, "FID per plane")
    js, md = r.write()
    data = json.loads(js.read_text())
    assert data["fid"] == {"xy": 1.5, "yz": None, "mean": 2.0}
    assert data["plots"] == ["fid_planes.png"]
    text = md.read_text()
    assert "| xy | 1.5 |" in text and "| yz | n/a |" in text and "![FID per plane](fid_planes.png)" in text
    assert (tmp_path / "out" / "fid_planes.png").is_file()


def test_markdown_table_marks_failures():
    t = markdown_table([{"organ": "liver", "passed": True}, {"organ": "bone", "passed": False}])
    assert "| liver | yes |" in t and "| bone | **no** |" in t


@pytest.mark.parametrize("seed, n, d", [(0, 40, 6), (1, 10, 16), (2, 200, 3)])
def test_frechet_matches_scipy_sqrtm(seed, n, d):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(n, d)) @ rng.normal(size=(d, d))
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6, abs=1e-8)
