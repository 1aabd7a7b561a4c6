"""The label vocabulary, modality codes, body regions and HU quality ranges."""

import pytest

from maisi import labels


def test_vocabulary_size_and_known_ids():
    table = labels.name_to_id()
    ids = set(table.values())
    assert labels.BODY in ids and not ids & set(labels.PLACEHOLDER_IDS)
    assert ids - {labels.BODY} <= set(range(1, 133))
    assert len(ids) == 132 - len(labels.PLACEHOLDER_IDS) + 1  # 124 named classes + body
    for name, i in [("liver", 1), ("spleen", 3), ("pancreas", 4), ("right kidney", 5), ("left kidney", 14),
                    ("brain", 22), ("lung tumor", 23), ("hepatic tumor", 26), ("skull", 120),
                    ("bone lesion", 128), ("airway", 132), ("body", 200)]:
        assert labels.label_id(name) == i and labels.label_name(i) == name


@pytest.mark.parametrize("query, expected", [("LIVER", 1), ("left_kidney", 14), (" spleen ", 3), ("200", 200), (6, 6)])
def test_lookup_is_forgiving(query, expected):
    assert labels.label_id(query) == expected


@pytest.mark.parametrize("query, message", [("livr", "did you mean 'liver'"), (2, "not in the MAISI vocabulary"),
                                            (999, "not in the MAISI vocabulary"), ("xyzzy", "unknown anatomy")])
def test_lookup_errors_help(query, message):
    with pytest.raises(ValueError, match=message):
        labels.label_id(query)


def test_modalities_and_regions():
    assert labels.modality_code("CT") == 1 and labels.modality_code("mri_t1") == 9 and labels.modality_code(0) == 0
    with pytest.raises(ValueError, match="unknown modality"):
        labels.modality_code("pet")
    with pytest.raises(ValueError, match="unknown modality code"):
        labels.modality_code(7)
    assert [labels.region_index(r) for r in ("head", "chest", "abdomen", "pelvis")] == [0, 1, 2, 3]
    assert labels.region_one_hot(2) == [0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="unknown body region"):
        labels.region_index("knee")
    assert labels.regions_in_mask({0, 200, 28, 1, 5}) == (1, 2)
    assert labels.regions_in_mask({22, 93}) == (0, 3)
    assert labels.regions_in_mask({0, 200}) is None


def test_quality_ranges_match_reference():
    r = labels.hu_quality_ranges()
    expected = {"liver": (-21.6, 162.0), "spleen": (-43.1, 184.1), "pancreas": (-56.6, 149.5),
                "kidney": (-130.6, 267.3), "lung": (-1088.6, -367.0), "bone": (71.4, 1000.0),
                "brain": (-951.0, 369.5)}
    for organ, (lo, hi) in expected.items():
        assert r[organ] == pytest.approx((lo, hi), abs=0.06)
