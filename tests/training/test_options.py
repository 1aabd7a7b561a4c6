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
]


@pytest.mark.parametrize("cls, bad, message, argv, cli_message", BAD_FIELDS, ids=[next(iter(b[1])) for b in BAD_FIELDS])
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
