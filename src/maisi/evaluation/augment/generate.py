"""Synthetic pairs for the experiment, made with `Pipeline.generate`: pair k from seed generation_seed + k."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from maisi.evaluation.augment.data import Case
from maisi.evaluation.augment.options import DEMO_MODEL, AugmentOptions
from maisi.pipeline.pipeline import Pipeline
from maisi.pipeline.validation import GenerationRequest

Log = Callable[[str], None] | None


def request_for(options: AugmentOptions, k: int, train: Sequence[Case]) -> GenerationRequest:
    """Pair k's request: source masks / tumor use training mask k mod len(train) (tumours inpainted for tumor);
    database draws a mask from the model's mask database on the first training case's grid."""
    o = options
    common = {"seed": o.generation_seed + k, "steps": o.generation_steps, "quality_retries": 0}
    if o.source == "database":
        return GenerationRequest(mask_source="database", **common)
    return GenerationRequest(mask=str(train[k % len(train)].label), tumor=tuple(o.tumors), **common)


def load_pipeline(options: AugmentOptions, device: str) -> Pipeline:
    return Pipeline.from_pretrained(None if options.model == DEMO_MODEL else options.model, device=device,
                                    progress=False)


def generate_pairs(pipe: Pipeline, options: AugmentOptions, train: Sequence[Case], folder: Path, rank: int = 0,
                   world_size: int = 1, log: Log = None) -> None:
    """Write this rank's share (k % world_size == rank) of the pairs into `folder`, skipping those already there
    (their record is written last), so an interrupted generation resumes."""
    n = options.pairs_needed()
    for k in range(rank, n, world_size):
        request = request_for(options, k, train)
        if (folder / f"sample_seed{request.seed}_record.json").is_file():
            continue
        pipe.generate(request, out=folder, rank=0, world_size=1,
                      on_event=(lambda m, k=k: log(f"pair {k}: {m}")) if log else None)
        if log:
            log(f"generated pair {k + 1}/{n} (seed {request.seed})")
