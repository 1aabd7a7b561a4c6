"""The data-free benchmark's sets: "real" training phantoms and a held-out set (other seeds, other anatomy)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maisi.data.phantom import make_phantom, write_datalist, write_phantom

TRAIN_REGIONS = ("abdomen",)
TEST_REGIONS = ("abdomen", "chest-abdomen")  # the held-out set also sees a longer field of view
TEST_SEED = 90000  # held-out seeds start here; training seeds at 0
LABELS = (1, 3, 5, 14)  # liver, spleen, right and left kidney: in every training and test phantom


@dataclass(frozen=True)
class PhantomSets:
    train: Path  # datalist .json ("training")
    test: Path  # datalist .json ("testing")


def make_phantom_sets(folder: str | Path, n_train: int = 4, n_test: int = 8, size: int = 64, spacing: float = 4.0,
                      log: Callable[[str], None] | None = None) -> PhantomSets:
    """Write n_train training phantoms (seeds 0.., TRAIN_REGIONS) and n_test held-out ones (seeds TEST_SEED..,
    TEST_REGIONS in turn) with their datalists into `folder`; sets already written are kept as they are."""
    folder = Path(folder)
    sets = PhantomSets(folder / "train.json", folder / "test.json")
    plan = ((sets.train, "training", "real", 0, TRAIN_REGIONS, n_train),
            (sets.test, "testing", "test", TEST_SEED, TEST_REGIONS, n_test))
    for datalist, key, prefix, seed0, regions, n in plan:
        if datalist.is_file():
            continue
        entries = []
        for i in range(n):
            p = make_phantom(regions[i % len(regions)], size=size, spacing=spacing, seed=seed0 + i)
            entries.append(write_phantom(p, folder, f"{prefix}{i:03d}"))
        write_datalist(datalist, entries, key)  # last: its presence marks a complete set
        if log:
            log(f"wrote {n} {prefix} phantoms ({', '.join(regions)}) to {folder}")
    return sets
