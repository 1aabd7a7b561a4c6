"""Peak memory of the released mask autoencoder's decode (random weights, fp32, CPU): the 125 class logits kept
whole, against the argmax taken segment by segment (`Autoencoder.decode(argmax=True)`), each beside the planner's
estimate. Each case runs in its own process, whose peak resident set is reset (/proc/self/clear_refs) after a
warm-up, so the figure is what the decode adds. Run by hand (Linux), e.g.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 benchmarks/mask_decode_memory.py --cases 32:argmax 32:logits 64:argmax
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from maisi.config import mask_preset
from maisi.io.atomic import atomic_write_text
from maisi.maskgen.networks import build_mask_autoencoder
from maisi.networks.memory import plan_memory


def status_gb(key: str) -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 2**20


def measure(latent: int, mode: str) -> dict:
    torch.manual_seed(0)
    ae = build_mask_autoencoder(mask_preset("mask-ct")).eval()
    z = torch.randn(1, 4, latent, latent, latent)
    argmax = mode == "argmax"
    with torch.no_grad():
        ae.decode(z[..., :4, :4, :4], argmax=True)  # the libraries' one-time buffers
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status_gb("VmRSS")
        plan = plan_memory(ae, "decode", tuple(z.shape), None, argmax=argmax)
        t0 = time.perf_counter()
        ae.decode(z, argmax=argmax)
        seconds = time.perf_counter() - t0
    peak = status_gb("VmHWM")
    return {"output": [4 * latent] * 3, "mode": mode, "plan": plan.describe(), "estimated_gb": round(plan.estimated_gb, 3),
            "grew_gb": round(peak - base, 3), "process_peak_gb": round(peak, 3), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["32:argmax", "32:logits", "64:argmax"],
                    help="LATENT:MODE, mode argmax or logits (latent 64 is the released 256³)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mask_decode_memory.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        latent, mode = a.one.split(":")
        print(json.dumps(measure(int(latent), mode)))
        return
    rows = []
    for case in a.cases:
        out = subprocess.run([sys.executable, __file__, "--one", case], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['output'][0]}^3 {r['mode']}: grew {r['grew_gb']:.2f} GB (process peak {r['process_peak_gb']:.2f}), "
              f"estimate {r['estimated_gb']:.2f} GB, {r['seconds']:.0f} s", flush=True)
    result = {"command": "python3 benchmarks/mask_decode_memory.py --cases " + " ".join(a.cases),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cases": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
