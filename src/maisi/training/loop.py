"""The training loop shared by the three stages: setup → resume → step → report → checkpoint → export."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from maisi.config import MaskGenConfig, ModelConfig, from_dict, to_dict
from maisi.io.atomic import atomic_write_text
from maisi.io.checkpoint import save_pretrained
from maisi.training import distributed as D
from maisi.training.state import (
    METRICS_FILE,
    batch_samples,
    item_of_sample,
    list_checkpoints,
    mix_seed,
    sample_generator,
    save_checkpoint,
    trim_metrics,
)

RUN_FILE = "run.json"
EXPORT_DIR = "export"


class Stage(Protocol):
    """What a training stage gives the loop (see vae.py, diffusion.py, controlnet.py)."""

    name: str
    component: str
    config: ModelConfig

    def modules(self) -> dict[str, nn.Module]: ...  # everything whose weights the checkpoint holds

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]: ...

    def extra_state(self) -> dict[str, Any]: ...  # tensors / plain data, e.g. scale_factor

    def load_extra_state(self, state: dict[str, Any]) -> None: ...

    def export(self) -> tuple[nn.Module, dict[str, Any]]: ...  # inference model and its `extra`


@dataclass(frozen=True)
class LoopOptions:
    run_dir: Path
    steps: int  # total optimisation steps of the run (a resumed run continues up to it)
    batch_size: int  # global batch: split evenly over the processes
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    keep_checkpoints: int = 2
    num_workers: int = 0
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


class SampleDataset(Dataset):
    """Indexed by global sample number: picks the item of a data source (ImagePatches, LatentCases; shuffled
    epochs) and loads it with the sample's own generator, so sample k is the same whatever the batching."""

    def __init__(self, source: Any, seed: int):
        self.source, self.seed = source, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, sample: int) -> dict[str, Any]:
        item = item_of_sample(sample, len(self.source), self.seed)
        out = self.source.load(item, sample_generator(self.seed, sample, stream=1), sample)
        out["sample"] = torch.tensor(sample)
        return out


class StepBatches(Sampler[list[int]]):
    """Batches of global sample numbers for steps start..steps-1 of one rank (deterministic by step)."""

    def __init__(self, start: int, steps: int, batch_size: int, world: D.World):
        self.start, self.steps, self.batch_size, self.world = start, steps, batch_size, world

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield list(batch_samples(step, self.batch_size, self.world.rank, self.world.size))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one process's samples; samples of different shapes cannot share a batch."""
    shapes = {k: {tuple(s[k].shape) for s in samples} for k in samples[0] if torch.is_tensor(samples[0][k])}
    mixed = {k: sorted(v) for k, v in shapes.items() if len(v) > 1}
    if mixed:
        raise ValueError(
            f"samples of different shapes in one batch ({mixed}); use one sample per process "
            "(batch_size = number of processes) or data of one size"
        )
    return default_collate(samples)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked (the default on GPU), else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext()


def poly_lr(lr: float, step: int, steps: int, power: float) -> float:
    """Polynomial decay lr·(1 − step/steps)^power, a function of the step alone (so resuming is exact)."""
    return lr * max(0.0, 1.0 - step / steps) ** power


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def check_run_dir(run_dir: Path, stage: str, config: ModelConfig | MaskGenConfig, options: dict[str, Any],
                  fixed: Collection[str] = (), scope: Callable[[Any], Any] = to_dict,
                  advice: str = "resume with the same config or use another run folder") -> dict[str, Any] | None:
    """The record (run.json) of the run in `run_dir`, None for a new folder; reads, writes nothing. Refuses a folder
    that holds another stage, a config that differs in `scope(config)` (the part of the config the stage's
    training depends on, default: all of it; `advice` ends that refusal), or, once it holds a checkpoint to resume
    from, options named in `fixed` (those that change what the run computes) whose recorded values differ from
    `options` (a run that stopped before its first checkpoint starts again from step 0, with the new values)."""
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        return None
    try:
        old = json.loads(run_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{run_file}: the run's record is not valid JSON ({e}); restore it, or use another run "
                         "folder (out)") from e
    if old.get("stage") != stage:
        raise ValueError(f"{run_dir} holds a {old.get('stage')!r} run, not {stage!r}; use another run folder")
    if not _same_config(old.get("config"), config, scope):
        raise ValueError(f"{run_dir} holds a run with another model config; {advice}")
    recorded = old.get("options", {})
    changed = [k for k in fixed if k in recorded and _comparable(recorded[k]) != _comparable(options.get(k))]
    if changed and list_checkpoints(run_dir):
        values = ", ".join(f"{k} (recorded {json.dumps(recorded[k])}, given {json.dumps(_plain(options.get(k)))})"
                           for k in changed)
        raise ValueError(f"{run_dir} holds a run trained with other options: {values}; these change what the run "
                         "computes, so it cannot resume with them: give the recorded values to resume it, or use "
                         "another run folder (out) for a new run")
    return old


def write_run_dir(run_dir: Path, stage: str, config: ModelConfig | MaskGenConfig, options: dict[str, Any],
                  previous: dict[str, Any] | None = None, step: int = 0) -> None:
    """Write config.json and run.json: the stage, the config, `options` (this invocation's) and the run's history
    of invocations (`previous`'s, from check_run_dir) with this one appended: when it started, the step it resumed
    at and the options it changed (all of them for the first)."""
    cfg = to_dict(config)
    options = _plain(options)
    history = list((previous or {}).get("invocations") or [])
    if previous and not history:  # a run.json written before maisi kept the history: its options open it
        history.append({"options": previous.get("options", {})})
    entry: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "step": step}
    if previous:
        recorded = previous.get("options", {})
        entry["changed"] = {k: {"recorded": recorded.get(k), "given": v} for k, v in options.items()
                            if _comparable(recorded.get(k)) != _comparable(v)}
    else:
        entry["options"] = options
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(cfg, indent=2) + "\n")
    record = {"stage": stage, "config": cfg, "options": options, "invocations": [*history, entry]}
    atomic_write_text(run_dir / RUN_FILE, json.dumps(record, indent=2) + "\n")


def prepare_run_dir(run_dir: Path, stage: str, config: ModelConfig | MaskGenConfig, options: dict[str, Any],
                    scope: Callable[[Any], Any] = to_dict,
                    advice: str = "resume with the same config or use another run folder",
                    fixed: Collection[str] = (), step: int = 0) -> None:
    """check_run_dir, then write_run_dir."""
    previous = check_run_dir(run_dir, stage, config, options, fixed, scope, advice)
    write_run_dir(run_dir, stage, config, options, previous, step)


def _plain(value: Any) -> Any:
    """`value` as run.json holds it (tuples become lists)."""
    return json.loads(json.dumps(value))


def _comparable(value: Any) -> Any:
    """An option's value for comparison with its record: a path to an existing file or folder counts by where it
    leads, so a run resumes from another working folder, or after a maisi that recorded relative paths."""
    value = _plain(value)
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _same_config(saved: Any, config: Any, scope: Callable[[Any], Any] = to_dict) -> bool:
    """Whether a run.json's config is `config` within `scope`; fields a later maisi added are compared at their
    defaults, so a run folder still resumes after an upgrade."""
    try:
        return scope(from_dict(type(config), saved)) == scope(config)
    except (TypeError, ValueError):
        return False


def _state(stage: Stage, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "stage": stage.name,
        "modules": {k: D.unwrap(m).state_dict() for k, m in stage.modules().items()},
        "optimizers": {k: o.state_dict() for k, o in stage.optimizers().items()},
        "extra": stage.extra_state(),
    }


def _restore(stage: Stage, state: dict[str, Any]) -> int:
    if state.get("stage") != stage.name:
        raise ValueError(f"checkpoint is of stage {state.get('stage')!r}, not {stage.name!r}")
    for k, m in stage.modules().items():
        D.unwrap(m).load_state_dict(state["modules"][k])
    for k, o in stage.optimizers().items():
        o.load_state_dict(state["optimizers"][k])
    stage.load_extra_state(state.get("extra", {}))
    return int(state["step"])


def _tensorboard(run_dir: Path, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional extra)
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def training_loop(stage: Stage, dataset: Dataset, opts: LoopOptions, world: D.World, *, state: dict[str, Any] | None,
                  log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Train `stage` to opts.steps, resuming from `state`: the run folder's last checkpoint, which the caller reads
    (load_latest_checkpoint) before any work, or None to start at step 0; it is emptied once restored, so that its
    tensors are freed. Returns the last metrics. `log` receives the main process's one-line notes (the resume
    point)."""
    # Setup.
    if opts.batch_size % world.size:
        raise ValueError(f"batch_size {opts.batch_size} must be a multiple of the {world.size} processes")
    run_dir = Path(opts.run_dir)
    metrics_path = run_dir / METRICS_FILE

    # Resume.
    start = 0
    if state:
        start = _restore(stage, state)
        state.clear()
    if world.is_main:
        trim_metrics(metrics_path, start)
        if start and log is not None:
            log(f"resuming {stage.name} training at step {start} from {run_dir}")
    D.barrier(world)

    loader = DataLoader(
        dataset, batch_sampler=StepBatches(start, opts.steps, opts.batch_size, world),
        num_workers=opts.num_workers, collate_fn=collate,
    )
    writer = _tensorboard(run_dir, opts.tensorboard) if world.is_main else None
    bar = None
    if world.is_main and opts.progress:
        bar = tqdm(total=opts.steps, initial=start, desc=f"train {stage.name}", unit="step", dynamic_ncols=True)

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    count, last, t0 = 0, {}, time.perf_counter()
    step = start
    for step_batch in loader:
        # Step: re-seed from (seed, rank, step) so a resumed run repeats the uninterrupted one.
        torch.manual_seed(mix_seed(opts.seed, world.rank, step))
        batch = {k: v.to(world.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in step_batch.items()}
        metrics = stage.train_step(batch, step)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
        count += 1
        step += 1

        # Report.
        if step % opts.log_every == 0 or step == opts.steps:
            means = D.mean_over_ranks({k: v / counts[k] for k, v in sums.items()}, world)
            dt = time.perf_counter() - t0
            rec = {"step": step, "samples": step * opts.batch_size, **means,
                   "sec_per_step": dt / count}
            if world.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if writer is not None:
                    for k, v in means.items():
                        writer.add_scalar(f"{stage.name}/{k}", v, step)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k.startswith("loss")})
            last, sums, counts, count, t0 = means, {}, {}, 0, time.perf_counter()
        if bar is not None:
            bar.update(1)

        # Checkpoint.
        if step % opts.checkpoint_every == 0 or step == opts.steps:
            if world.is_main:
                save_checkpoint(run_dir, step, _state(stage, step), keep=opts.keep_checkpoints)
            D.barrier(world)

    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()

    # Export: slim inference weights + config (rank 0).
    if world.is_main:
        model, extra = stage.export()
        save_pretrained(run_dir / EXPORT_DIR, model, stage.config, stage.component, extra=extra)
    D.barrier(world)
    return last
