"""Training state: deterministic seeds and data order, atomic checkpoints that survive a crash mid-write."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from maisi.training import state as S


def test_mix_seed_is_deterministic_and_distinguishes_its_parts():
    assert S.mix_seed(0, 1, 2) == S.mix_seed(0, 1, 2)
    seeds = {S.mix_seed(seed, rank, step) for seed in range(3) for rank in range(3) for step in range(50)}
    assert len(seeds) == 450 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("batch, world", [(4, 1), (4, 2), (6, 3), (8, 4)])
def test_batch_shards_partition_the_global_batch(batch, world):
    for step in range(3):
        shards = [list(S.batch_samples(step, batch, r, world)) for r in range(world)]
        assert sum(shards, []) == list(range(step * batch, (step + 1) * batch))


def test_every_item_once_per_epoch_and_epochs_differ():
    n = 7
    epochs = [[S.item_of_sample(e * n + k, n, seed=3) for k in range(n)] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1]


def test_sample_generator_depends_on_sample_not_on_batching():
    a = torch.randn(3, generator=S.sample_generator(0, 17))
    assert torch.equal(a, torch.randn(3, generator=S.sample_generator(0, 17)))
    assert not torch.equal(a, torch.randn(3, generator=S.sample_generator(0, 18)))


def _state(step: int) -> dict:
    return {"step": step, "modules": {"m": {"w": torch.full((4,), float(step))}}}


def test_checkpoints_keep_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        S.save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [s for s, _ in S.list_checkpoints(tmp_path)] == [3, 4]
    assert S.load_latest_checkpoint(tmp_path)["step"] == 4


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path, monkeypatch):
    S.save_checkpoint(tmp_path, 5, _state(5))
    real_save = torch.save

    def dies_midway(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")  # partial bytes, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        S.save_checkpoint(tmp_path, 10, _state(10))
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in S.list_checkpoints(tmp_path)] == [5]
    assert list((tmp_path / S.CHECKPOINT_DIR).iterdir()) == [S.checkpoint_file(tmp_path, 5)]  # no temp left
    loaded = S.load_latest_checkpoint(tmp_path)
    assert loaded["step"] == 5 and torch.equal(loaded["modules"]["m"]["w"], torch.full((4,), 5.0))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    S.save_checkpoint(tmp_path, 1, _state(1))
    S.save_checkpoint(tmp_path, 2, _state(2))
    S.checkpoint_file(tmp_path, 2).write_bytes(b"garbage")
    with pytest.warns(S.CheckpointWarning, match="training-state-000000002.pt: unreadable .*resumes from "
                                                 "training-state-000000001.pt"):
        assert S.load_latest_checkpoint(tmp_path)["step"] == 1


def test_a_folder_without_checkpoints_starts_fresh(tmp_path):
    assert S.load_latest_checkpoint(tmp_path) is None
    (tmp_path / S.CHECKPOINT_DIR).mkdir()
    assert S.load_latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("damage", ["truncated", "empty", "another step"])
def test_a_folder_whose_checkpoints_are_all_damaged_is_refused_not_restarted(tmp_path, damage):
    """Regression: with every checkpoint unreadable the run silently restarted at step 0 (cutting metrics.jsonl and,
    at its first checkpoint, deleting the damaged files). Now it is an error naming the folder and every file, with
    how to start over; nothing is warned about as if a fallback were coming."""
    for step in (2, 4):
        S.save_checkpoint(tmp_path, step, _state(step))
    for step in (2, 4):
        path = S.checkpoint_file(tmp_path, step)
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[:100])
        elif damage == "empty":
            path.write_bytes(b"")
        else:
            torch.save(_state(step + 1), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipped" warning: there is nothing to fall back to
        with pytest.raises(ValueError, match="none of its 2 checkpoint") as e:
            S.load_latest_checkpoint(tmp_path)
    message = str(e.value)
    assert str(tmp_path / S.CHECKPOINT_DIR) in message and "\n" not in message
    assert "training-state-000000002.pt" in message and "training-state-000000004.pt" in message
    assert {"truncated": "unreadable (RuntimeError: ", "empty": "empty file",
            "another step": "not a training state of step 4"}[damage] in message
    assert "move those files" in message and "another run folder (out)" in message
    assert len(S.list_checkpoints(tmp_path)) == 2  # nothing removed


def test_checkpoints_refuse_pickled_code(tmp_path):
    path = S.checkpoint_file(tmp_path, 3)
    path.parent.mkdir(parents=True)
    torch.save({"step": 3, "fn": print}, path)  # not a tensor container: weights_only refuses it
    with pytest.raises(ValueError, match="training-state-000000003.pt: unreadable"):
        S.load_latest_checkpoint(tmp_path)


def test_trim_metrics_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
    S.trim_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
