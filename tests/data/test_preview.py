"""Preview montage: orientation, aspect ratio from spacing, label overlay, PNG written atomically."""

import numpy as np
import pytest
from PIL import Image

from maisi.data.preview import render_preview, save_preview


def test_montage_honours_spacing_and_orientation():
    img = np.full((20, 10, 8), -1000.0, np.float32)
    img[15:, :, :] = 1000.0  # patient right (high x in RAS) ...
    out = render_preview(img, spacing=(1.0, 2.0, 5.0), height=40)
    # Panels: axial 20×20 mm, coronal 20×40 mm, sagittal 20×40 mm; scale = 40 px / 40 mm.
    assert out.size == (20 + 20 + 20 + 2 * 4, 40)
    axial = np.asarray(out)[10:30, :20, 0]  # vertically centred in the 40 px row
    assert axial[:, :5].min() == 255 and axial[:, 6:].max() == 0  # ... shows on the left (radiological)


def test_overlay_colours_labels_but_not_body(tmp_path):
    img = np.zeros((16, 16, 16), np.float32)
    lab = np.full(img.shape, 200, np.uint8)
    lab[4:8, 4:8, :] = 1
    path = save_preview(tmp_path / "p.png", img, lab, (1, 1, 1), height=16, with_plain=True)
    rgb = np.asarray(Image.open(path))
    assert rgb.shape == (16 * 2 + 4, 16 * 3 + 8, 3)
    over = rgb[20:]
    assert (over[..., 0] != over[..., 1]).any() or (over[..., 1] != over[..., 2]).any()  # coloured voxels
    plain = rgb[:16]
    assert (plain[..., 0] == plain[..., 1]).all()  # grey row
    with pytest.raises(ValueError, match="differs"):
        render_preview(img, lab[:8])
