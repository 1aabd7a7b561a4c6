"""Training as a typed library: run_stage takes a stage's options; errors name the field, the CLI the flag."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from maisi.cli import build_parser
from maisi.cli.train import flagged, flags_of
from maisi.training.options import (
    ControlNetTrainOptions,
    DiffusionTrainOptions,
    VAETrainOptions,
)
from maisi.training.run import TrainResult, run_stage
from train_support import assert_bitwise_equal, export_weights, latent_datalist, train

QUIET = {"progress": False, "tensorboard": False, "device": "cpu"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return latent_datalist(tmp_path_factory.mktemp("latents"), n=2)


def test_run_stage_from_python_matches_the_cli(data, tmp_path):
    """Two steps of the tiny UNet from Python: a typed result, the run folder's files, and the very weights
    `maisi train diffusion` gives for the same settings."""
    options = DiffusionTrainOptions(data=data, out=tmp_path / "py", config="tiny", steps=2, batch_size=2,
                                    log_every=1, **QUIET)
    result = run_stage(options)
    assert isinstance(result, TrainResult)
    assert result.run_dir == tmp_path / "py" and result.step == 2 and "loss" in result.metrics
    assert (result.export_dir / "model.safetensors").is_file()
    recorded = json.loads((result.run_dir / "run.json").read_text())
    assert recorded["stage"] == "diffusion" and recorded["options"] == json.loads(json.dumps(options.record()))

    assert train("diffusion", "--data", str(data), "--out", str(tmp_path / "cli"), "--config", "tiny",
                 "--steps", "2", "--batch-size", "2", "--log-every", "1", "--device", "cpu") == 0
    assert_bitwise_equal(export_weights(tmp_path / "py"), export_weights(tmp_path / "cli"))


# (options class, bad field value, the library's message, the same value as flags, the CLI's message)
BAD_FIELDS = [
    (DiffusionTrainOptions, {"ema_decay": 1.0}, "ema_decay must be in [0, 1)", ["--ema-decay", "1"],
     "--ema-decay must be in [0, 1)"),
    (DiffusionTrainOptions, {"steps": 0}, "steps must be >= 1", ["--steps", "0"], "--steps must be >= 1"),
    (DiffusionTrainOptions, {"scale_factor": -1.0}, "scale_factor must be > 0", ["--scale-factor", "-1"],
     "--scale-factor must be > 0"),
    (VAETrainOptions, {"lr_power": -1.0}, "lr_power must be >= 0", ["--lr-power", "-1"], "--lr-power must be >= 0"),
    (VAETrainOptions, {"patch": (8, 16)}, "patch_switch needs 1 increasing step(s)", ["--patch", "8", "16"],
     "--patch-switch needs 1 increasing step(s)"),
    (VAETrainOptions, {"augment": "heavy"}, "augment must be one of 'none', 'flip', 'standard'",
     ["--augment", "heavy"], "--augment must be one of 'none', 'flip', 'standard'"),
    (ControlNetTrainOptions, {"tumor_weight": 0.5}, "tumor_weight must be >= 1", ["--tumor-weight", "0.5"],
     "--tumor-weight must be >= 1"),
    # regression: keep_checkpoints 0 was refused only at the first checkpoint write, after training steps, as "keep"
    (DiffusionTrainOptions, {"keep_checkpoints": 0}, "keep_checkpoints must be >= 1", ["--keep-checkpoints", "0"],
     "--keep-checkpoints must be >= 1"),
    (DiffusionTrainOptions, {"checkpoint_every": 0}, "checkpoint_every must be >= 1", ["--checkpoint-every", "0"],
     "--checkpoint-every must be >= 1"),
    (DiffusionTrainOptions, {"log_every": -1}, "log_every must be >= 1", ["--log-every", "-1"],
     "--log-every must be >= 1"),
    (DiffusionTrainOptions, {"batch_size": 0}, "batch_size must be >= 1", ["--batch-size", "0"],
     "--batch-size must be >= 1"),
    (DiffusionTrainOptions, {"lr": 0.0}, "lr must be > 0", ["--lr", "0"], "--lr must be > 0"),
    (DiffusionTrainOptions, {"lr": float("nan")}, "lr must be a finite number", ["--lr", "nan"],
     "--lr must be a finite number"),
    (ControlNetTrainOptions, {"tumor_weight": float("inf")}, "tumor_weight must be a finite number",
     ["--tumor-weight", "inf"], "--tumor-weight must be a finite number"),
    (DiffusionTrainOptions, {"seed": -1}, "seed must be in 0..", ["--seed", "-1"], "--seed must be in 0.."),
    (DiffusionTrainOptions, {"seed": 2**64}, "seed must be in 0..", ["--seed", str(2**64)], "--seed must be in 0.."),
    (DiffusionTrainOptions, {"workers": -1}, "workers must be >= 0", ["--workers", "-1"], "--workers must be >= 0"),
    (DiffusionTrainOptions, {"threads": 0}, "threads must be >= 1", ["--threads", "0"], "--threads must be >= 1"),
    (VAETrainOptions, {"perceptual_fraction": 0.0}, "perceptual_fraction must be in (0, 1]",
     ["--perceptual-fraction", "0"], "--perceptual-fraction must be in (0, 1]"),
    (VAETrainOptions, {"adv_start": -1}, "adv_start must be >= 0", ["--adv-start", "-1"], "--adv-start must be >= 0"),
    (VAETrainOptions, {"disc_layers": 0}, "disc_layers must be >= 1", ["--disc-layers", "0"],
     "--disc-layers must be >= 1"),
    (VAETrainOptions, {"disc_channels": 0}, "disc_channels must be >= 1", ["--disc-channels", "0"],
     "--disc-channels must be >= 1"),
    (VAETrainOptions, {"patch": (16,)}, "patch 16 is smaller than the 3-layer discriminator takes (24 voxels",
     ["--patch", "16"], "--patch 16 is smaller than the 3-layer discriminator takes (24 voxels"),
    (VAETrainOptions, {"patch": (32, 64), "patch_switch": (0,)}, "patch_switch needs 1 increasing step(s) >= 1",
     ["--patch", "32", "64", "--patch-switch", "0"], "--patch-switch needs 1 increasing step(s) >= 1"),
]


@pytest.mark.parametrize("cls, bad, message, argv, cli_message", BAD_FIELDS,
                         ids=[f"{k}={v}" for b in BAD_FIELDS for k, v in list(b[1].items())[-1:]])
def test_a_bad_field_names_the_field_in_python_and_the_flag_on_the_command_line(
        cls, bad, message, argv, cli_message, data, tmp_path, capsys):
    unet = {"unet": "rflow-ct"} if cls is ControlNetTrainOptions else {}
    with pytest.raises(ValueError, match="^" + re.escape(message)) as e:
        cls(data=data, out=tmp_path / "run", **unet, **bad)
    assert "--" not in str(e.value)

    code = train(cls.stage, "--data", str(data), "--out", str(tmp_path / "run"), *argv,
                 *(["--unet", "rflow-ct"] if unet else []))
    assert code == 2 and f"maisi train: error: {cli_message}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder


@pytest.mark.parametrize(
    "message, expected",
    [
        ("lr_power must be >= 0, got -1", "--lr-power must be >= 0, got -1"),
        ("samples of different shapes; use one sample per process (batch_size = number of processes)",
         "samples of different shapes; use one sample per process (--batch-size = number of processes)"),
        ("use a larger patch or fewer disc_layers", "use a larger patch or fewer --disc-layers"),  # mid-sentence
        ("/runs/test_batch_size0: the run folder is an existing file",  # words inside a path stay as they are
         "/runs/test_batch_size0: the run folder is an existing file"),
        ("datalist is empty", "datalist is empty"),  # 'data' is a field, 'datalist' is not
        ("tensorboard must be a bool", "--no-tensorboard must be a bool"),
        # a refused resume lists fields with their values: those become flags, a path that ends in one does not
        ("runs/a holds a run trained with other options: seed (recorded 0, given 1), lr (recorded 0.1, given 1.0), "
         "patch_switch (recorded [], given [2]); use another run folder (out)",
         "runs/a holds a run trained with other options: --seed (recorded 0, given 1), --lr (recorded 0.1, given 1.0), "
         "--patch-switch (recorded [], given [2]); use another run folder (out)"),
        ("/runs/seed (recorded data) is kept", "/runs/seed (recorded data) is kept"),
    ],
)
def test_cli_puts_library_messages_in_flags(message, expected):
    assert flagged(message, flags_of(VAETrainOptions)) == expected


def _choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_field_is_set_by_the_flag_the_cli_names_it_by():
    """The CLI maps flags to fields by dest: every field of every stage's options has its flag in that
    stage's parser, under the field's name (or, for progress/tensorboard, its --no- opposite)."""
    stages = _choices(_choices(build_parser())["train"])
    for cls in (VAETrainOptions, DiffusionTrainOptions, ControlNetTrainOptions):
        actions = {s: a.dest for a in stages[cls.stage]._actions for s in a.option_strings}
        for name, flag in flags_of(cls).items():
            assert actions.get(flag) in (name, "no_" + name), (cls.stage, name, flag)
