"""Validation of generation requests: every error says what is allowed; released-model rules; warnings."""

from __future__ import annotations

import pytest

from maisi.cli.generate import in_flags
from maisi.config import preset
from maisi.pipeline.validation import (
    GenerationRequest,
    anatomy_ids,
    check_geometry,
    check_numbers,
    check_sampler,
    parse_regions,
    rules_for,
    triple,
    tumor_ids,
)

RELEASED = rules_for(preset("rflow-ct"))
TINY = rules_for(preset("tiny"))


def test_rules_released_vs_tiny():
    assert RELEASED.xy_sizes == (256, 384, 512) and RELEASED.z_range == (128, 768, 128)
    assert TINY.xy_sizes is None and TINY.divisor == preset("tiny").image_divisor == 32
    assert rules_for(preset("ddpm-ct")).xy_sizes == (256, 384, 512)


@pytest.mark.parametrize("size, spacing, rules, match", [
    ((48, 64, 64), (2, 2, 2), TINY, r"multiple of 32.*nearest allowed: \[32, 64\]"),
    ((0, 64, 64), (2, 2, 2), TINY, "positive"),
    ((64, 64, 64), (2, -1, 2), TINY, "positive mm"),
    ((256, 384, 256), (1.5, 1.5, 1.5), RELEASED, r"X = Y in \[256, 384, 512\]"),
    ((128, 128, 128), (1.5, 1.5, 1.5), RELEASED, r"X = Y in"),
    ((256, 256, 896), (1.5, 1.5, 1.5), RELEASED, r"Z must be in 128\.\.768 in steps of 128"),
    ((256, 256, 256), (0.3, 0.3, 1.0), RELEASED, r"x/y spacing must be in 0\.5\.\.3\.0"),
    ((256, 256, 256), (1.0, 1.0, 6.0), RELEASED, r"z spacing must be in 0\.5\.\.5\.0"),
])
def test_geometry_errors(size, spacing, rules, match):
    with pytest.raises(ValueError, match=match):
        check_geometry(size, spacing, (1, 1), rules)


def test_fov_warnings_suggest_spacing():
    assert check_geometry((512, 512, 256), (1.0, 1.0, 1.0), (1, 2), RELEASED) == []
    (w,) = check_geometry((256, 256, 256), (1.0, 1.0, 1.0), (1, 1), RELEASED)
    assert "256 mm is below the advised 384 mm" in w and "try spacing 1.5 or a larger size" in w and "--" not in w
    assert "try --spacing 1.5 or a larger --size" in in_flags(w)  # as `maisi generate` prints it
    assert check_geometry((256, 256, 128), (1.0, 1.0, 1.0), (0, 0), RELEASED) == []  # head: 256 mm is enough
    assert check_geometry((64, 64, 64), (1.0, 1.0, 1.0), (1, 1), TINY) == []  # no advice for other models


@pytest.mark.parametrize("values, cast, expected", [((2,), float, (2.0,) * 3), (3, int, (3, 3, 3)),
                                                   ((1, 2, 3), int, (1, 2, 3))])
def test_triple(values, cast, expected):
    assert triple(values, "size", cast) == expected


@pytest.mark.parametrize("values, cast, match", [((1, 2), int, "1 or 3 values"), ((1.5,), int, "whole numbers"),
                                                 (("a",), float, "numbers")])
def test_triple_errors(values, cast, match):
    with pytest.raises(ValueError, match=match):
        triple(values, "size", cast)


@pytest.mark.parametrize("field, value, match", [
    ("num_samples", 0, "num_samples"), ("batch_size", 0, "batch_size"), ("seed", -1, "seed"),
    ("steps", 0, r"1\.\.1000"), ("steps", 1001, r"1\.\.1000"), ("guidance", -1.0, "guidance"),
    ("memory_gb", 0.0, "memory_gb"), ("quality_retries", -1, "quality_retries"), ("mask_source", "x", "mask_source"),
])
def test_number_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        check_numbers(GenerationRequest(**{field: value}), 1000)


def test_sampler_rules():
    check_sampler("rflow", "rflow")
    check_sampler("ddim", "ddpm")
    with pytest.raises(ValueError, match=r"trained with rflow.*\['rflow'\], not ddpm"):
        check_sampler("ddpm", "rflow")
    with pytest.raises(ValueError, match="unknown sampler"):
        check_sampler("euler", "rflow")


def test_regions_anatomy_tumours():
    assert parse_regions(["chest"]) == (1, 1)
    assert parse_regions(["chest", "abdomen"]) == (1, 2) == parse_regions(["chest-abdomen"])
    assert parse_regions([]) is None
    with pytest.raises(ValueError, match="top region first"):
        parse_regions(["pelvis", "chest"])
    with pytest.raises(ValueError, match="one region or a span of two"):
        parse_regions(["head", "chest", "pelvis"])
    with pytest.raises(ValueError, match="unknown body region"):
        parse_regions(["belly"])
    assert anatomy_ids(["liver", "left_kidney", "liver"]) == (1, 14)
    with pytest.raises(ValueError, match="did you mean 'liver'"):
        anatomy_ids(["livr"])
    assert tumor_ids(["hepatic tumor"]) == (26,)
    with pytest.raises(ValueError, match="not a tumour that can be inpainted"):
        tumor_ids(["liver"])


def test_fields_the_rest_of_the_request_makes_useless_are_warned_about():
    from maisi.pipeline.validation import unused_fields

    assert unused_fields(GenerationRequest()) == []
    assert unused_fields(GenerationRequest(anatomy_size=(("liver", 0.5),), mask_sampler="rflow", mask_steps=5)) == []
    (w,) = unused_fields(GenerationRequest(mask_sampler="ddpm", mask_guidance=3.0))
    assert w.startswith("mask_sampler, mask_guidance set the mask generation model") and "no effect" in w
    assert "--anatomy-size uses" in in_flags(w)
    assert unused_fields(GenerationRequest(mask="m.nii.gz", mask_database="db")) == [
        "mask_database has no effect with a mask: the mask given is used"]
    assert unused_fields(GenerationRequest(mask_mapping="m.json")) == [
        "mask_mapping converts a mask given with it: no effect without one"]
