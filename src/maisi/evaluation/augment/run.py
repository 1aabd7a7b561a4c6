"""`evaluate_augment`: every check before any compute, then generate, train each arm × seed (resumable, sharded over
torchrun's processes), score the test set and write the report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from maisi.evaluation.augment.data import (
    build_arms,
    check_not_from_test,
    check_sets,
    load_cases,
    load_synthetic,
    scored_labels,
)
from maisi.evaluation.augment.generate import generate_pairs, load_pipeline, request_for
from maisi.evaluation.augment.options import AugmentOptions
from maisi.evaluation.augment.report import curve_chart, interval_chart, markdown, mean_curve
from maisi.evaluation.augment.stats import class_mean, paired_difference, summarize
from maisi.evaluation.augment.train import RESULT_FILE, read_curve, score_run, train_run
from maisi.evaluation.errors import OptionError
from maisi.evaluation.options import Report
from maisi.evaluation.report import write_report
from maisi.io.atomic import OutputLocationError, atomic_write_text, check_output_dir
from maisi.labels import label_name
from maisi.training import distributed as D

Log = Callable[[str], None] | None
SYNTHETIC_DIR, RUNS_DIR = "synthetic", "runs"


def _say(log: Log, msg: str) -> None:
    if log:
        log(msg)


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / RUNS_DIR / arm.replace("+", "_plus_") / f"seed{seed}"


def evaluate_augment(options: AugmentOptions, log: Log = None) -> Report:
    """Run the experiment of `options` (see AugmentOptions) and write augment.json / .md / PNGs into options.out.

    Under torchrun each process generates every world_size-th pair and trains every world_size-th run; rank 0
    writes the report. Re-running the same command skips finished runs and resumes an interrupted one."""
    o = options
    out = Path(o.out)
    # --- checks, before any compute ---------------------------------------------------------------------
    try:
        check_output_dir(out, "report folder")
    except OutputLocationError as e:
        raise OptionError(str(e), "out") from None
    real = load_cases(o.train, o.train_key, "train")
    test = load_cases(o.test, o.test_key, "test")
    check_sets(real, test)
    labels = scored_labels(real, test, o.labels)
    world = D.init(o.device)
    synth_dir = Path(o.synthetic) if o.synthetic is not None else out / SYNTHETIC_DIR
    pipe = None
    if o.model is not None and o.pairs_needed():
        pipe = load_pipeline(o, str(world.device))
        pipe.plan(request_for(o, 0, real))  # a request the model cannot serve fails here
    synthetic = load_synthetic(synth_dir) if o.synthetic is not None else []
    if o.synthetic is not None:
        check_not_from_test(synthetic, test)
        build_arms(o, real, synthetic)  # enough pairs for every arm
    _say(log, f"{len(real)} real training cases, {len(test)} test cases; labels "
              f"{', '.join(label_name(v) for v in labels)}; arms {', '.join(o.arm_names())} × {o.seeds} seeds")
    t0 = time.time()
    # --- synthetic pairs ----------------------------------------------------------------------------------
    if pipe is not None:
        generate_pairs(pipe, o, real, synth_dir, world.rank, world.size, log)
        D.barrier(world)
        synthetic = load_synthetic(synth_dir)[: o.pairs_needed()]
        check_not_from_test(synthetic, test)
    arms = build_arms(o, real, synthetic)
    # --- training and scoring: run i on rank i % world_size ---------------------------------------------
    jobs = [(arm, seed) for arm in arms for seed in range(o.seeds)]
    data: dict = {}
    for i, (arm, seed) in enumerate(jobs):
        folder = run_dir(out, arm, seed)
        if i % world.size != world.rank or (folder / RESULT_FILE).is_file():
            continue
        signature = {"arm": arm, "seed": seed, "labels": list(labels), "recipe": o.recipe.to_json(),
                     "train": [[c.image_sha, c.label_hash] for c in arms[arm]],
                     "test": [[c.image_sha, c.label_hash] for c in test]}
        _say(log, f"training {arm} seed {seed} on {len(arms[arm])} cases")
        net = train_run(folder, arms[arm], labels, o.recipe, seed, signature, log, data=data)
        scores = score_run(net, test, labels, o.recipe, data)
        atomic_write_text(folder / RESULT_FILE, json.dumps(scores) + "\n")
    D.barrier(world)
    seconds = time.time() - t0
    # --- statistics and report ----------------------------------------------------------------------------
    result = summarize_runs(o, out, arms, len(real), labels, [c.image.name for c in test])
    result["seconds"] = round(seconds, 1)
    result["synthetic_source"] = (f"{o.source} via {o.model}" if pipe is not None
                                  else str(o.synthetic) if o.synthetic is not None else "none")
    base = result["arms"]["baseline"]["dice"]["mean"]["mean"]
    best = max(((a, v["dice_vs_baseline"]["mean"]) for a, v in result["arms"].items() if a != "baseline"),
               key=lambda t: t[1]["mean"] if t[1]["mean"] is not None else -1, default=None)
    summary = f"baseline mean Dice {base:.4f}"
    if best is not None:
        d = best[1]
        summary += (f"; best arm {best[0]}: {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] vs baseline")
    files: list[Path] = []
    if world.is_main:
        dice = {a: (v["dice"]["mean"]["mean"], *v["dice"]["mean"]["ci"]) for a, v in result["arms"].items()}
        curves = {a: mean_curve([read_curve(run_dir(out, a, s)) for s in range(o.seeds)]) for a in arms}
        plots = {"dice": interval_chart(dice, f"Mean Dice per arm ({int(o.confidence * 100)}% bootstrap interval)"),
                 "learning_curves": curve_chart(curves, "Training loss (DiceCE), mean over seeds")}
        files = write_report(out, "augment", result, markdown(result), plots)
    return Report("augment", result, summary, tuple(files))


def summarize_runs(o: AugmentOptions, out: Path, arms: dict, n_real: int, labels: tuple[int, ...],
                   test_names: list[str]) -> dict:
    """The JSON result: per arm, class and metric the mean with its interval and the paired difference to the
    baseline; the per-run, per-case scores as well."""
    classes = [label_name(v) for v in labels]
    scores = {}
    for arm in arms:  # seeds × cases × classes, NaN where a case lacks the class
        runs = [json.loads((run_dir(out, arm, s) / RESULT_FILE).read_text()) for s in range(o.seeds)]
        scores[arm] = {m: np.array([[[np.nan if v is None else v for v in case] for case in r[m]] for r in runs])
                       for m in ("dice", "hd95")}
    stats = {"resamples": o.bootstrap, "seed": o.bootstrap_seed, "confidence": o.confidence,
             "scheme": "percentile bootstrap over test cases and training seeds (maisi.evaluation.augment.stats)"}
    result = {"labels": list(labels), "classes": classes, "real_cases": n_real, "test_cases": len(test_names),
              "test": test_names, "seeds": o.seeds, "recipe": o.recipe.to_json(), "statistics": stats, "arms": {}}
    boot = {"resamples": o.bootstrap, "seed": o.bootstrap_seed, "confidence": o.confidence}
    real = {c.image for c in arms["baseline"]}
    for arm, cases in arms.items():
        n = sum(c.image in real for c in cases)
        entry = {"n_real": n, "n_synthetic": len(cases) - n}
        for m in ("dice", "hd95"):
            x, b = scores[arm][m], scores["baseline"][m]
            per = {name: x[..., i] for i, name in enumerate(classes)} | {"mean": class_mean(x)}
            ref = {name: b[..., i] for i, name in enumerate(classes)} | {"mean": class_mean(b)}
            entry[m] = {k: summarize(v, **boot) for k, v in per.items()}
            if arm != "baseline":
                entry[f"{m}_vs_baseline"] = {k: paired_difference(v, ref[k], **boot) for k, v in per.items()}
            entry[f"{m}_per_run"] = scores[arm][m].tolist()
        result["arms"][arm] = entry
    return result
