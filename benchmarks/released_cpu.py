"""What a real MAISI volume costs without a GPU: `maisi generate --weights` on released-layout rflow-ct files.

Writes NVIDIA's three files (autoencoder_v1.pt, diff_unet_3d_rflow-ct.pt, controlnet_3d_rflow-ct.pt) with the
released architecture and random weights (every layer non-zero, so no branch is skipped), then runs
`maisi generate` on them as a user would, once per precision, each in its own process, and records the wall
time and peak RSS. The images are noise (the weights are random): this measures cost, not quality.

    PYTHONPATH=src python3 benchmarks/released_cpu.py --size 256 256 128 --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from maisi.config import preset
from maisi.io.atomic import atomic_write_text
from maisi.networks import build


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Small random values in every parameter (zero-initialised output layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.ndim > 1 else 0.01))


def write_released(folder: Path) -> list[Path]:
    cfg = preset("rflow-ct")
    files = {"autoencoder": folder / "autoencoder_v1.pt", "unet": folder / "diff_unet_3d_rflow-ct.pt",
             "controlnet": folder / "controlnet_3d_rflow-ct.pt"}
    for i, (comp, path) in enumerate(files.items()):
        net = build(comp, cfg)
        if comp != "autoencoder":
            randomise(net, i)
        state = net.state_dict()
        obj = {"autoencoder": state, "unet": {"unet_state_dict": state, "scale_factor": torch.tensor(1.0)},
               "controlnet": {"controlnet_state_dict": state}}[comp]
        torch.save(obj, path)
        del net, state, obj
    return list(files.values())


def run(files: list[Path], size: list[int], spacing: list[float], precision: str, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "maisi", "generate", "--weights", *map(str, files), "--size", *map(str, size),
           "--spacing", *map(str, spacing), "--steps", str(steps), "--precision", precision, "--device", "cpu",
           "--no-quality-check", "--seed", "0", "--out", str(out)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode:
        raise SystemExit(f"maisi generate failed ({precision}):\n{proc.stderr[-3000:]}")
    return {"precision": precision, "wall_s": round(wall, 1),
            "peak_rss_gib": round(int(peak.group(1)) / 2**20, 2) if peak else None, "command": " ".join(cmd[2:]),
            # other work on the machine stretches the wall time: the 1-minute load average before and after
            "load_avg_before_after": [round(load, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=3, default=[256, 256, 128])
    p.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 2.0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/released_cpu.json"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="maisi-released-") as tmp:
        files = write_released(Path(tmp))
        runs = []
        for prec in a.precisions:
            runs.append(run(files, a.size, a.spacing, prec, a.steps, Path(tmp) / f"gen-{prec}"))
            print(json.dumps(runs[-1]), flush=True)
    result = {"size": a.size, "spacing": a.spacing, "steps": a.steps, "controlnet": True, "runs": runs,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
