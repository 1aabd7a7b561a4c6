"""Library messages name fields; the CLI shows the flags that set them."""

import numpy as np

from maisi.cli import main
from maisi.cli.flags import in_flags
from maisi.data.phantom import make_phantom
from maisi.io.volume import write_volume


def test_phrases_longest_first_and_a_leading_field():
    phrases = {"mask_source='none'": "--no-mask", "mask": "--mask"}
    assert in_flags("mask needs a ControlNet; not with mask_source='none'", phrases, ("mask",)) == \
        "--mask needs a ControlNet; not with --no-mask"  # one pass: "--no-mask" is not rewritten again
    assert in_flags("memory_gb is too small", {"memory_gb": "--memory-gb"}) == "--memory-gb is too small"


def test_prepare_prints_the_flag_its_library_names_as_a_field(tmp_path, capsys):
    ph = make_phantom("chest", (32, 32, 24), 8.0, seed=4)
    write_volume(tmp_path / "in" / "scan.nii.gz", np.round(ph.image), ph.affine, np.int16)
    assert main(["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--multiple-of", "16"]) == 1
    out = capsys.readouterr().out
    assert "FAILED scan" in out and "give --region" in out and "give region" not in out
