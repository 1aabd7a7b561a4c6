"""Resumable training state: atomic checkpoints that keep their predecessor, seeds and data order by step."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from maisi.io.atomic import atomic_path, atomic_write_text

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"  # the run's metrics log (see trim_metrics)
_NAME = re.compile(r"^training-state-(\d{9})\.pt$")


def checkpoint_file(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"training-state-{step:09d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in a run folder, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` (tensors and plain containers only) as the checkpoint of `step`, atomically.

    The new file appears complete or not at all; only after it exists are checkpoints beyond the newest
    `keep` removed, so a crash at any moment leaves the previous checkpoint intact."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    path = checkpoint_file(run_dir, step)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped for an older one (the CLI prints it as one line)."""


def load_latest_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest readable checkpoint of a run folder, or None if it holds no checkpoint.

    A damaged checkpoint is skipped for the one before it (a CheckpointWarning each); a folder whose checkpoints
    are all damaged is a ValueError naming them: starting over from step 0 would overwrite the run's metrics and,
    at its first checkpoint, the damaged files themselves."""
    found = list_checkpoints(run_dir)
    damaged = []
    for step, path in reversed(found):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # empty, truncated, not a zip, pickled code, ...: say why in one line
            why = _first_sentence(e)
            damaged.append((path, "empty file" if not path.stat().st_size else
                            f"unreadable ({type(e).__name__}{': ' + why if why else ''})"))
            continue
        if isinstance(state, dict) and state.get("step") == step:  # written as an int by save_checkpoint
            for bad, reason in damaged:
                warnings.warn(f"{bad}: {reason}; skipped: the run resumes from {path.name}", CheckpointWarning,
                              stacklevel=2)
            return state
        damaged.append((path, f"not a training state of step {step}"))
    if found:
        files = "; ".join(f"{path.name}: {reason}" for path, reason in damaged)
        raise ValueError(f"{Path(run_dir) / CHECKPOINT_DIR}: none of its {len(found)} checkpoint(s) can be read "
                         f"({files}), so the run cannot resume, and starting it over would overwrite its history; to "
                         f"start over in {run_dir}, move those files (and {METRICS_FILE}) out of it, or give another "
                         f"run folder (out)")
    return None


def _first_sentence(error: Exception) -> str:
    """The first sentence of an error message (torch's checkpoint errors run to a paragraph)."""
    text = " ".join(str(error).split())
    return text.split(". ")[0].rstrip(".")[:200]


# ---------------------------------------------------------------------------------------------
# Seeds and data order: functions of (seed, step, sample) only, so a resumed run repeats itself
# ---------------------------------------------------------------------------------------------

_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), e.g. mix_seed(seed, rank, step) like edm2."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK


def sample_generator(seed: int, sample: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of global sample `sample`: the same whatever the batch size or process count."""
    return torch.Generator().manual_seed(mix_seed(seed, sample, stream))


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """Item order of one pass over the data."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(mix_seed(seed, 0xDA7A, epoch)))


def batch_samples(step: int, batch_size: int, rank: int, world_size: int) -> range:
    """Global sample numbers this rank trains on at `step` (the global batch split into equal shards)."""
    local = batch_size // world_size
    start = step * batch_size + rank * local
    return range(start, start + local)


def item_of_sample(sample: int, num_items: int, seed: int) -> int:
    """Which data item global sample number `sample` is (epochs of shuffled passes)."""
    epoch, pos = divmod(sample, num_items)
    return int(epoch_order(num_items, seed, epoch)[pos])


# ---------------------------------------------------------------------------------------------
# Metrics log: JSON lines, trimmed back to the checkpoint on resume
# ---------------------------------------------------------------------------------------------


def trim_metrics(path: str | Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run that died before its next checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if int(rec.get("step", 0)) <= last_step:
            keep.append(json.dumps(rec))
    atomic_write_text(path, "".join(k + "\n" for k in keep))
