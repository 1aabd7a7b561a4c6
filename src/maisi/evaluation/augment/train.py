"""One run of the experiment: train the recipe's MONAI segmenter on an arm's cases (resumable), score the test set."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.nets import BasicUNet, SegResNet
from monai.networks.utils import one_hot
from monai.transforms import RandSpatialCrop, ScaleIntensityRange, SpatialPad
from monai.utils import convert_to_tensor

from maisi.evaluation.augment.data import Case
from maisi.evaluation.augment.options import SegmenterRecipe
from maisi.evaluation.inputs import read_hu, read_label
from maisi.io.atomic import atomic_write_text
from maisi.training.state import load_latest_checkpoint, mix_seed, save_checkpoint, trim_metrics

Log = Callable[[str], None] | None
RUN_FILE, METRICS_FILE, RESULT_FILE = "run.json", "metrics.jsonl", "result.json"


def build_net(recipe: SegmenterRecipe, n_classes: int) -> torch.nn.Module:
    """The recipe's network: len(windows) input channels, background + n_classes outputs."""
    f, c_in = recipe.features, len(recipe.windows)
    if recipe.network == "segresnet":
        return SegResNet(spatial_dims=3, init_filters=f, in_channels=c_in, out_channels=n_classes + 1)
    return BasicUNet(spatial_dims=3, in_channels=c_in, out_channels=n_classes + 1,
                     features=(f, 2 * f, 4 * f, 8 * f, 16 * f, f))


def load_case(case: Case, recipe: SegmenterRecipe, labels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(C×X×Y×Z input: one [0, 1] channel per HU window, 1×X×Y×Z class index map, spacing)."""
    hu, spacing = read_hu(case.image)
    label = read_label(case.label, hu.shape)
    lut = np.zeros(256, np.int64)  # MAISI id → class index (body and unscored ids: background)
    for i, v in enumerate(labels, start=1):
        lut[v] = i
    hu_t = torch.from_numpy(hu)
    x = torch.stack([convert_to_tensor(ScaleIntensityRange(a, b, 0.0, 1.0, clip=True)(hu_t), track_meta=False)
                     for a, b in recipe.windows]).float()
    return x, torch.from_numpy(lut[label])[None], spacing


def train_run(run_dir: Path, cases: Sequence[Case], labels: Sequence[int], recipe: SegmenterRecipe, seed: int,
              signature: dict, log: Log = None, on_step: Callable[[int], None] | None = None,
              data: dict | None = None) -> torch.nn.Module:
    """Train the recipe on `cases` in `run_dir`, resuming from its newest checkpoint; step t's crops follow from
    (seed, t) alone, so a resumed run ends where an uninterrupted one does. `signature` (the run's recipe, data and
    labels) is written to run.json; a folder holding another run is refused. `data` caches loaded cases."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_file = run_dir / RUN_FILE
    if run_file.is_file() and json.loads(run_file.read_text()) != signature:
        raise ValueError(f"{run_dir} holds a run with other settings (see {run_file}); use another out folder")
    atomic_write_text(run_file, json.dumps(signature, indent=2) + "\n")
    data = {} if data is None else data
    vols = []
    for c in cases:
        if c.image not in data:
            data[c.image] = load_case(c, recipe, labels)
        x, y, _ = data[c.image]
        vols.append(SpatialPad(recipe.patch)(torch.cat([x, y.float()])))  # one crop cuts image and label alike
    torch.manual_seed(seed)
    net = build_net(recipe, len(labels))
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.steps)
    start = 0
    state = load_latest_checkpoint(run_dir)
    if state is not None:  # resume
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = int(state["step"])
        trim_metrics(run_dir / METRICS_FILE, start)
        if log:
            log(f"{run_dir.name}: resuming at step {start}/{recipe.steps}")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    crop = RandSpatialCrop(roi_size=list(recipe.patch), random_size=False)
    t0 = time.time()
    net.train()
    for step in range(start, recipe.steps):
        rng = np.random.default_rng(mix_seed(seed, step))  # the step's cases and crops: (seed, step) only
        batch = []
        for j, i in enumerate(rng.integers(0, len(vols), recipe.batch)):
            crop.set_random_state(seed=mix_seed(seed, step, j) % 2**32)
            batch.append(convert_to_tensor(crop(vols[i]), track_meta=False))
        xy = torch.stack(batch)
        loss = loss_fn(net(xy[:, :-1]), xy[:, -1:].round().long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if done % recipe.log_every == 0 or done == recipe.steps:
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps({"step": done, "loss": round(loss.item(), 6)}) + "\n")
            if log:
                log(f"{run_dir.parent.name}/{run_dir.name}: step {done}/{recipe.steps} loss {loss.item():.4f} "
                    f"({time.time() - t0:.0f} s)")
        if done % recipe.checkpoint_every == 0 or done == recipe.steps:
            save_checkpoint(run_dir, done, {"step": done, "net": net.state_dict(), "opt": opt.state_dict(),
                                            "sched": sched.state_dict()})
        if on_step is not None:
            on_step(done)
    return net.eval()


@torch.no_grad()
def score_run(net: torch.nn.Module, test: Sequence[Case], labels: Sequence[int], recipe: SegmenterRecipe,
              data: dict | None = None) -> dict[str, list[list[float | None]]]:
    """Per test case and class: Dice and HD95 (mm) from MONAI's metrics on the sliding-window prediction.
    A class absent from a case's ground truth scores None (left out of the means); a class present but not
    predicted has HD95 = the volume's diagonal (mm), the largest distance possible."""
    data = {} if data is None else data
    n = len(labels) + 1
    dice_m = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd_m = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    dice, hd95 = [], []
    for c in test:
        if c.image not in data:
            data[c.image] = load_case(c, recipe, labels)
        x, y, spacing = data[c.image]
        logits = sliding_window_inference(x[None], list(recipe.patch), 4, net, overlap=0.25, mode="gaussian")
        pred = one_hot(logits.argmax(1, keepdim=True), n)
        truth = one_hot(y[None], n)
        with warnings.catch_warnings():  # an unpredicted class: MONAI warns, its HD95 is set below
            warnings.simplefilter("ignore")
            d = dice_m(pred, truth)[0]
            h = hd_m(pred, truth, spacing=list(spacing))[0]
        present = truth[0, 1:].flatten(1).any(1)
        diagonal = float(np.linalg.norm(np.asarray(x.shape[1:]) * np.asarray(spacing)))
        dice.append([float(v) if p else None for v, p in zip(d.tolist(), present.tolist())])
        hd95.append([(float(v) if np.isfinite(v) else diagonal) if p else None for v, p in zip(h.tolist(), present.tolist())])
    return {"dice": dice, "hd95": hd95}


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["loss"])) for r in recs]
