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



def test_field_names_inside_paths_and_file_names_stay_as_typed(tmp_path, capsys):
    phrases = {"memory_gb": "--memory-gb", "mask_mapping": "--mask-mapping", "anatomy_conditions": "--anatomy-conditions"}
    for path in ("my_memory_gb_dir/mask_mapping.nii.gz", "all_memory_gb.json", "out/anatomy_conditions",
                 "anatomy_conditions/x", "a-memory_gb", "C:\\anatomy_conditions"):
        assert in_flags(f"no such file or folder: {path}", phrases) == f"no such file or folder: {path}"
    assert in_flags("memory_gb.", phrases) == "--memory-gb."  # a full stop ends the field
    assert in_flags("(memory_gb=0.1) or mask_mapping, then", phrases) == "(--memory-gb=0.1) or --mask-mapping, then"
    # end to end: the file the user named is shown as typed
    assert main(["generate", "--mask", str(tmp_path / "my_memory_gb_dir" / "mask_mapping.nii.gz"),
                 "--out", str(tmp_path / "g")]) == 2
    assert "my_memory_gb_dir/mask_mapping.nii.gz" in capsys.readouterr().err
    assert main(["generate", "--mask-mapping", str(tmp_path / "m.json"), "--out", str(tmp_path / "g")]) == 2
    assert f"--mask-mapping file not found: {tmp_path / 'm.json'}" in capsys.readouterr().err


def test_prepare_prints_the_flag_its_library_names_as_a_field(tmp_path, capsys):
    ph = make_phantom("chest", (32, 32, 24), 8.0, seed=4)
    write_volume(tmp_path / "in" / "scan.nii.gz", np.round(ph.image), ph.affine, np.int16)
    assert main(["prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--multiple-of", "16"]) == 1
    out = capsys.readouterr().out
    assert "FAILED scan" in out and "give --region" in out and "give region" not in out
