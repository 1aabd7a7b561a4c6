"""A run folder across invocations: damaged checkpoints are never a silent restart, and a resume may change how
the run is driven (length, checkpoints, reporting) but not what it computes; run.json keeps every invocation."""

from __future__ import annotations

import json
import shutil

import pytest

from maisi.training.state import CHECKPOINT_DIR, list_checkpoints
from train_support import latent_datalist, metrics, train

RUN = ["--config", "tiny", "--batch-size", "2", "--checkpoint-every", "2", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return latent_datalist(tmp_path_factory.mktemp("latents"), n=2)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A 4-step diffusion run: checkpoints at steps 2 and 4, a metrics record per step."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train("diffusion", "--data", str(data), "--out", str(run), "--steps", "4", *RUN) == 0
    return run


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _files(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_before_any_work(data, finished, tmp_path, capsys):
    """Regression: with every checkpoint unreadable, re-running the command trained from step 0 (exit 0), cut
    metrics.jsonl back to nothing and printed UserWarnings with Python source lines. Now: one error line naming the
    folder, the files and how to start over, and the run folder is left exactly as it was."""
    run = _copy(finished, tmp_path)
    for _, path in list_checkpoints(run):
        path.write_bytes(path.read_bytes()[:100])  # truncated, e.g. a full disk or a bad copy
    before = _files(run)
    capsys.readouterr()
    assert train("diffusion", "--data", str(data), "--out", str(run), "--steps", "6", *RUN) == 2
    out, err = capsys.readouterr()
    assert "resuming" not in out
    line = err.strip()
    assert "\n" not in line and line.startswith("maisi train: error: ") and "Traceback" not in line
    assert str(run / CHECKPOINT_DIR) in line
    assert "training-state-000000002.pt" in line and "training-state-000000004.pt" in line
    assert "move those files" in line and "(--out)" in line
    assert _files(run) == before  # no metrics cut, no run.json rewritten, no checkpoint removed
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]


def test_a_damaged_newest_checkpoint_falls_back_with_a_one_line_warning(data, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    newest = list_checkpoints(run)[-1][1]
    newest.write_bytes(b"")
    capsys.readouterr()
    assert train("diffusion", "--data", str(data), "--out", str(run), "--steps", "4", *RUN) == 0
    out, err = capsys.readouterr()
    assert f"resuming diffusion training at step 2 from {run}" in out
    warning = [line for line in err.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith(f"maisi train: warning: {newest}: empty file; skipped")
    assert "training-state-000000002.pt" in warning[0] and "warnings.warn" not in err and "UserWarning" not in err
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # steps 3 and 4 trained again


# (flags of the resumed invocation, the CLI's note on the refused option)
CHANGED = [
    (["--seed", "1"], "--seed (recorded 0, given 1)"),
    (["--lr", "0.001"], "--lr (recorded 0.0001, given 0.001)"),
    (["--batch-size", "1"], "--batch-size (recorded 2, given 1)"),
    (["--ema-decay", "0.9"], "--ema-decay (recorded 0.999, given 0.9)"),
    (["--latent", "sample"], '--latent (recorded "mean", given "sample")'),
    (["--seed", "1", "--lr-power", "1"], "--seed (recorded 0, given 1), --lr-power (recorded 2.0, given 1.0)"),
]


@pytest.mark.parametrize("flags, note", CHANGED, ids=[" ".join(c[0]) for c in CHANGED])
def test_resuming_with_options_that_change_the_computation_is_refused(data, finished, tmp_path, capsys, flags, note):
    """Regression: a resume with another --seed, --lr, ... was accepted silently and run.json then held only the
    last invocation's options. It is refused before any work, naming each option with both values and what to do."""
    run = _copy(finished, tmp_path)
    before = _files(run)
    capsys.readouterr()
    assert train("diffusion", "--data", str(data), "--out", str(run), "--steps", "6", *RUN, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and note in err, err
    assert "give the recorded values to resume it, or use another run folder (--out)" in err
    assert _files(run) == before


def test_resuming_with_another_datalist_is_refused(data, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    other = tmp_path / "other" / "datalist.json"
    other.parent.mkdir()
    shutil.copy(data, other)
    for name in ("case0_latent.safetensors", "case0_latent.safetensors.json", "case1_latent.safetensors",
                 "case1_latent.safetensors.json"):
        shutil.copy(data.parent / name, other.parent / name)
    capsys.readouterr()
    assert train("diffusion", "--data", str(other), "--out", str(run), "--steps", "6", *RUN) == 2
    err = capsys.readouterr().err
    assert f'--data (recorded "{data}", given "{other}")' in err


def test_resuming_may_change_how_the_run_is_driven_and_run_json_keeps_every_invocation(data, finished, tmp_path,
                                                                                    monkeypatch, capsys):
    """--steps (to extend a run), checkpoints, reporting and resources may change on resume; each invocation is
    recorded with what it changed. The datalist given by a relative path from elsewhere is the same datalist."""
    run = _copy(finished, tmp_path)
    monkeypatch.chdir(data.parent)
    assert train("diffusion", "--data", data.name, "--out", str(run), "--steps", "6", *RUN, "--checkpoint-every",
                 "3", "--keep-checkpoints", "1", "--log-every", "3", "--threads", "1") == 0
    assert "resuming diffusion training at step 4" in capsys.readouterr().out
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 6]
    assert [s for s, _ in list_checkpoints(run)] == [6]
    record = json.loads((run / "run.json").read_text())
    first, second = record["invocations"]
    assert first["step"] == 0 and first["options"]["steps"] == 4 and first["options"]["data"] == str(data)
    assert second["step"] == 4 and "options" not in second
    assert second["changed"].pop("out") == {"recorded": str(finished), "given": str(run)}  # the copied folder
    assert second["changed"] == {"steps": {"recorded": 4, "given": 6},
                                 "checkpoint_every": {"recorded": 2, "given": 3},
                                 "keep_checkpoints": {"recorded": 2, "given": 1},
                                 "log_every": {"recorded": 1, "given": 3},
                                 "threads": {"recorded": None, "given": 1}}
    assert record["options"]["steps"] == 6 and record["options"]["seed"] == 0  # the options the run now runs with


def test_a_run_json_written_before_the_history_resumes_and_opens_it(data, finished, tmp_path, monkeypatch):
    """A run folder from a maisi that kept only the last options (paths as given, here relative) still resumes."""
    run = _copy(finished, tmp_path)
    record = json.loads((run / "run.json").read_text())
    old_options = record["invocations"][0]["options"] | {"data": data.name}
    monkeypatch.chdir(data.parent)
    (run / "run.json").write_text(json.dumps({"stage": "diffusion", "config": record["config"],
                                              "options": old_options}))
    assert train("diffusion", "--data", str(data), "--out", str(run), "--steps", "5", *RUN) == 0
    history = json.loads((run / "run.json").read_text())["invocations"]
    assert history[0] == {"options": old_options}
    assert {k: v for k, v in history[1]["changed"].items() if k != "out"} == {"steps": {"recorded": 4, "given": 5}}


def test_a_run_that_stopped_before_its_first_checkpoint_may_start_again_with_other_options(data, tmp_path,
                                                                                          monkeypatch):
    """Nothing of such a run survives (it restarts at step 0), so its options are not held against the next
    invocation; run.json records the change."""
    from maisi.training.diffusion import DiffusionStage

    real = DiffusionStage.train_step

    def dies_at_step_1(self, batch, step):
        if step == 1:
            raise RuntimeError("killed")
        return real(self, batch, step)

    run = tmp_path / "run"
    monkeypatch.setattr(DiffusionStage, "train_step", dies_at_step_1)
    with pytest.raises(RuntimeError, match="killed"):
        train("diffusion", "--data", str(data), "--out", str(run), "--steps", "4", *RUN)
    monkeypatch.setattr(DiffusionStage, "train_step", real)
    assert not list_checkpoints(run) and [r["step"] for r in metrics(run)] == [1]
    assert train("diffusion", "--data", str(data), "--out", str(run), "--steps", "2", *RUN, "--seed", "1") == 0
    second = json.loads((run / "run.json").read_text())["invocations"][1]
    assert second["step"] == 0 and second["changed"] == {"steps": {"recorded": 4, "given": 2},
                                                         "seed": {"recorded": 0, "given": 1}}
