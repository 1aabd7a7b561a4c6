"""Configs: JSON round trips, presets, and ValueError for impossible combinations."""

import json

import pytest

from maisi.config import (
    PRESETS,
    AutoencoderConfig,
    ModelConfig,
    SchedulerConfig,
    UNetConfig,
    from_dict,
    load_model_config,
    preset,
    to_dict,
    with_overrides,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_json_round_trip(name, tmp_path):
    cfg = preset(name)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(to_dict(cfg), indent=2))
    assert load_model_config(path) == cfg
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_released_presets_match_reference_configs():
    ddpm, rflow = preset("ddpm-ct"), preset("rflow-ct")
    assert ddpm.unet.include_region_input and ddpm.unet.num_class_embeds is None
    assert not ddpm.unet.resblock_updown and not ddpm.unet.include_fc
    assert rflow.unet.num_class_embeds == 128 and rflow.unet.resblock_updown and rflow.unet.include_fc
    assert not rflow.unet.include_region_input
    assert ddpm.scheduler.kind == "ddpm" and rflow.scheduler.kind == "rflow"
    assert rflow.scheduler.num_inference_steps == 30 and ddpm.scheduler.num_inference_steps == 1000
    for cfg in (ddpm, rflow):
        assert cfg.autoencoder.channels == (64, 128, 256) and cfg.autoencoder.latent_channels == 4
        assert cfg.unet.channels == (64, 128, 256, 512) and cfg.unet.num_head_channels == (0, 0, 32, 32)
    assert preset("tiny").image_divisor == 32


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: AutoencoderConfig(channels=(64, 100, 256)), "divisible by norm_num_groups"),
        (lambda: AutoencoderConfig(num_res_blocks=(2, 2)), "one per level"),
        (lambda: AutoencoderConfig(split_axis=3), "split_axis"),
        (lambda: AutoencoderConfig(num_splits=0), "num_splits"),
        (lambda: UNetConfig(attention_levels=(False, True)), "one entry per level"),
        (lambda: UNetConfig(num_head_channels=(0, 0, 48, 32)), "num_head_channels"),
        (lambda: SchedulerConfig(kind="euler"), "ddpm, ddim or rflow"),
        (lambda: SchedulerConfig(num_inference_steps=0), "num_inference_steps"),
        (lambda: ModelConfig(unet=UNetConfig(in_channels=3, out_channels=3)), "latent_channels"),
        (lambda: preset("sdxl"), "unknown preset"),
        (lambda: from_dict(AutoencoderConfig, {"chanels": [1]}), "unknown field"),
        (lambda: from_dict(AutoencoderConfig, {"latent_channels": "four"}), "expected int"),
    ],
)
def test_invalid_configs_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_overrides_and_preset_files(tmp_path):
    cfg = with_overrides(preset("tiny"), {"scheduler": {"num_inference_steps": 7}})
    assert cfg.scheduler.num_inference_steps == 7 and cfg.unet == preset("tiny").unet
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"preset": "rflow-ct", "autoencoder": {"num_splits": 2}}))
    loaded = load_model_config(path)
    assert loaded.autoencoder.num_splits == 2 and loaded.unet == preset("rflow-ct").unet
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model_config(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown preset or missing config file"):
        load_model_config(tmp_path / "missing.json")
