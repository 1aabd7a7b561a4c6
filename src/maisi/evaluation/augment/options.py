"""What the augmentation experiment takes: the data, the synthetic source, the arms and the segmenter recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maisi.evaluation.errors import OptionError

Source = str | Path
NETWORKS = ("segresnet", "basicunet")
SOURCES = ("masks", "database", "tumor")  # training masks (ControlNet path), the mask database, tumours inpainted
DEMO_MODEL = "demo"  # `model` value of the shipped demo model (Pipeline.from_pretrained(None))


@dataclass(frozen=True)
class SegmenterRecipe:
    """The downstream segmenter: a MONAI network trained with DiceCELoss on random patches, the same in every arm.

    The default fits a small experiment (a dozen runs of 64³ volumes) in well under an hour on a 2-core CPU."""

    network: str = "segresnet"  # MONAI SegResNet or BasicUNet
    features: int = 8  # SegResNet init_filters; BasicUNet features (f, 2f, 4f, 8f, 16f, f)
    patch: tuple[int, int, int] = (32, 32, 32)  # training crop and sliding-window size (multiples of 16)
    batch: int = 2  # crops per step
    steps: int = 200  # Adam steps per run (the same in every arm: more data is more variety, not more steps)
    lr: float = 2e-3
    windows: tuple[tuple[float, float], ...] = ((-1000.0, 1000.0), (-160.0, 240.0))  # HU windows, one channel each
    checkpoint_every: int = 50
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise OptionError(f"{{recipe.network}} must be one of {list(NETWORKS)}, got {self.network!r}",
                              "recipe.network")
        if len(self.patch) != 3 or any(int(p) < 16 or int(p) % 16 for p in self.patch):
            raise OptionError(f"{{recipe.patch}} needs 3 multiples of 16, got {list(self.patch)}", "recipe.patch")
        for name in ("features", "batch", "steps", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise OptionError(f"{{recipe.{name}}} must be >= 1, got {getattr(self, name)}", f"recipe.{name}")
        if self.network == "segresnet" and self.features % 8:
            raise OptionError(f"{{recipe.features}}: SegResNet's group norm needs a multiple of 8, got {self.features}",
                              "recipe.features")
        if not self.lr > 0:
            raise OptionError(f"{{recipe.lr}} must be > 0, got {self.lr}", "recipe.lr")
        if not self.windows or any(len(w) != 2 or w[0] >= w[1] for w in self.windows):
            raise OptionError(f"{{recipe.windows}} must be (low, high) HU pairs, got {self.windows}", "recipe.windows")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AugmentOptions:
    """The controlled experiment: train the same segmenter on real data only (the baseline), on real + N synthetic
    pairs for each N in `counts`, and optionally on synthetic pairs only; score each run on the held-out test set."""

    train: Source  # real training pairs: a datalist .json (image + label per entry) or a folder
    test: Source  # held-out test pairs, same forms
    out: Source = "evaluation/augment"  # report folder; runs/ and synthetic/ inside it make re-runs resume
    model: str | None = None  # weights to generate with ("demo": the shipped demo model), or ...
    synthetic: Source | None = None  # ... a folder of already generated pairs (sample_*_image/_label/_record)
    source: str = "masks"  # how the model makes pairs: masks (each real training mask in turn), database, tumor
    tumors: tuple[str, ...] = ()  # source "tumor": tumours inpainted into the training masks
    counts: tuple[int, ...] = (4, 8)  # N of the real + N arms (the first N pairs: each arm's set holds the smaller)
    synthetic_only: bool = False  # add an arm trained on the max(counts) synthetic pairs alone
    seeds: int = 3  # training seeds per arm (0 .. seeds-1)
    labels: tuple[int, ...] | None = None  # MAISI ids to segment and score; None: every id of the training masks
    recipe: SegmenterRecipe = field(default_factory=SegmenterRecipe)
    generation_seed: int = 1000  # pair k is generated with seed generation_seed + k
    generation_steps: int | None = None  # sampler steps (None: the model's default)
    train_key: str = "training"  # datalist list of `train`
    test_key: str | None = None  # datalist list of `test` (None: testing, validation, then training)
    device: str = "cpu"
    bootstrap: int = 2000  # bootstrap resamples for the intervals
    bootstrap_seed: int = 0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.model is not None and self.synthetic is not None:
            raise OptionError("give {model} (to generate pairs) or {synthetic} (already generated pairs), not both",
                              "model", "synthetic")
        wants_pairs = bool(self.counts) or self.synthetic_only
        if wants_pairs and self.model is None and self.synthetic is None:
            raise OptionError("the synthetic arms need pairs: give {model} or {synthetic} (or no {counts})",
                              "model", "synthetic", "counts")
        if any(int(n) < 1 for n in self.counts) or len(set(self.counts)) != len(self.counts):
            raise OptionError(f"{{counts}} must be distinct positive numbers of pairs, got {list(self.counts)}",
                              "counts")
        if self.synthetic_only and not self.counts:
            raise OptionError("{synthetic_only} trains on max({counts}) pairs: give {counts}",
                              "synthetic_only", "counts")
        if self.source not in SOURCES:
            raise OptionError(f"{{source}} must be one of {list(SOURCES)}, got {self.source!r}", "source")
        if (self.source == "tumor") != bool(self.tumors):
            raise OptionError("{tumors} are given with {source} 'tumor', and only with it", "tumors", "source")
        if self.seeds < 1:
            raise OptionError(f"{{seeds}} must be >= 1, got {self.seeds}", "seeds")
        if self.labels is not None and (not self.labels or any(not 0 < int(v) < 256 for v in self.labels)):
            raise OptionError(f"{{labels}} must be MAISI ids in 1..255, got {self.labels}", "labels")
        if self.bootstrap < 100:
            raise OptionError(f"{{bootstrap}} needs at least 100 resamples, got {self.bootstrap}", "bootstrap")
        if not 0 < self.confidence < 1:
            raise OptionError(f"{{confidence}} must be in (0, 1), got {self.confidence}", "confidence")

    def arm_names(self) -> list[str]:
        """baseline, real+N for each N (ascending), then synthetic (with synthetic_only)."""
        return ["baseline", *(f"real+{n}" for n in sorted(self.counts))] + (["synthetic"] if self.synthetic_only else [])

    def pairs_needed(self) -> int:
        return max(self.counts, default=0)
