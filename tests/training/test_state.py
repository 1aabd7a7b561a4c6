"""Training state: deterministic seeds and data order, atomic checkpoints that survive a crash mid-write."""

from __future__ import annotations

import json

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
    with pytest.warns(UserWarning, match="unreadable"):
        assert S.load_latest_checkpoint(tmp_path)["step"] == 1


def test_checkpoints_refuse_pickled_code(tmp_path):
    path = S.checkpoint_file(tmp_path, 3)
    path.parent.mkdir(parents=True)
    torch.save({"step": 3, "fn": print}, path)  # not a tensor container: weights_only refuses it
    with pytest.warns(UserWarning):
        assert S.load_latest_checkpoint(tmp_path) is None


def test_trim_metrics_drops_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
    S.trim_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
