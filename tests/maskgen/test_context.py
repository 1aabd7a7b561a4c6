"""Size requests: every bad request refused before compute, naming the field; completion from a conditions
file in the layout of all_anatomy_size_conditions.json."""

import json

import numpy as np
import pytest

from maisi.maskgen.context import (
    ANATOMY_SIZE_NAMES,
    AnatomySizeError,
    check_request,
    complete_context,
    load_conditions,
    target_tumor,
)

#            gb    liver  stom  panc  colon  lungT  pancT  hepT  colonT  bone
ROWS = [
    [0.10, 0.30, 0.20, 0.40, 0.50, -1.0, -1.0, -1.0, -1.0, -1.0],
    [0.20, 0.70, 0.30, 0.50, 0.60, -1.0, -1.0, 0.40, -1.0, -1.0],
    [0.30, 0.90, 0.40, 0.60, 0.70, -1.0, 0.20, -1.0, -1.0, -1.0],
]


@pytest.fixture
def conditions(tmp_path):
    path = tmp_path / "all_anatomy_size_conditions.json"
    path.write_text(json.dumps([{"organ_size": row, "mask_file": f"m{i}.nii.gz"} for i, row in enumerate(ROWS)]))
    return load_conditions(path)


def test_the_ten_slots_are_in_the_reference_order():
    assert ANATOMY_SIZE_NAMES[:2] == ("gallbladder", "liver") and ANATOMY_SIZE_NAMES[-1] == "bone lesion"
    assert len(ANATOMY_SIZE_NAMES) == 10


def test_a_partial_request_takes_the_nearest_row_and_keeps_the_given_sizes(conditions):
    # liver 0.75 is nearest row 1 (|0.75-0.7|); its other slots fill the rest, the liver stays 0.75
    assert complete_context({"liver": 0.75}, conditions) == pytest.approx([0.2, 0.75, 0.3, 0.5, 0.6, -1, -1, 0.4, -1, -1])
    # L1 over every given slot: liver 0.8 alone would pick row 1 or 2, the pancreatic tumour decides row 2
    got = complete_context([("liver", 0.8), ("pancreatic tumor", 0.25)], conditions)
    assert got == pytest.approx([0.3, 0.8, 0.4, 0.6, 0.7, -1, 0.25, -1, -1, -1])
    # -1 takes part in the distance, as in the reference: "no hepatic tumour" moves liver 0.7 to row 0 or 2
    assert complete_context({"liver": 0.7, "hepatic tumor": -1}, conditions)[0] == pytest.approx(0.3)


def test_an_empty_request_takes_the_first_row_and_names_are_normalised(conditions):
    assert complete_context({}, conditions) == pytest.approx(ROWS[0])
    assert check_request({"Hepatic_Tumour": 0.3, " LIVER ": 1}) == {"hepatic tumor": 0.3, "liver": 1.0}


def test_the_target_tumour_is_read_from_the_completed_context(conditions):
    assert target_tumor(complete_context({"liver": 0.7}, conditions)) == 26
    assert target_tumor(ROWS[0]) is None
    assert target_tumor(complete_context({"bone lesion": 0.1}, conditions)) == 128


@pytest.mark.parametrize("request_,field,message", [
    ({"spleen": 0.3}, "spleen", "unknown structure; allowed: gallbladder, liver"),
    ({"livr": 0.3}, "livr", "did you mean 'liver'"),
    ({"liver": 1.2}, "liver", r"in \[0, 1\] or -1"),
    ({"liver": -0.5}, "liver", r"in \[0, 1\] or -1"),
    ({"liver": float("nan")}, "liver", r"in \[0, 1\] or -1"),
    ({"liver": "big"}, "liver", "must be a number"),
    ({"liver": True}, "liver", "must be a number"),
    ({"lung tumor": 0.2, "hepatic tumor": 0.1}, "hepatic tumor", "at most one tumour"),
    ([("liver", 0.2), ("Liver", 0.3)], "Liver", "given twice"),
    ([("liver", 0.5)] * 11, "anatomy_size", "at most 10 entries, got 11"),
    ([("liver",)], "anatomy_size", r"\(name, size\) pair"),
])
def test_bad_requests_are_refused_naming_the_field(conditions, request_, field, message):
    with pytest.raises(AnatomySizeError, match=message) as info:
        complete_context(request_, conditions)
    assert info.value.field == field and isinstance(info.value, ValueError)
    assert f"'{field}'" in str(info.value) or field == "anatomy_size"


@pytest.mark.parametrize("content,message", [
    ("{}", "non-empty list"),
    ("[]", "non-empty list"),
    ('[{"organ_size": [0.1, 0.2]}]', "entry 0 needs \"organ_size\": a list of 10"),
    ("not json", "not valid JSON"),
])
def test_a_conditions_file_of_another_layout_is_refused(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_conditions(path)


def test_conditions_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="K×10"):
        complete_context({"liver": 0.5}, np.zeros((3, 9)))
