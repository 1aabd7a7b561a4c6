"""One 3D convolution (64→64 channels, 3×3×3, 34³) in fp32 and bf16, contiguous and channels_last_3d, on this CPU.

Tells whether bf16 pays here: with native bf16 (AVX-512 BF16 / AMX) it is faster than fp32; without it
(AVX2) PyTorch's bf16 3D convolution is hundreds of times slower. Run by hand:
    python3 benchmarks/conv_dtype.py --threads 2
Writes benchmarks/results/conv_dtype.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--edge", type=int, default=34)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "conv_dtype.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for layout in ("contiguous", "channels_last_3d"):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, 64, args.edge, args.edge, args.edge).to(dtype)
            w = torch.randn(64, 64, 3, 3, 3).to(dtype)
            if layout == "channels_last_3d":
                x, w = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, w))
            F.conv3d(x, w)  # warm-up (oneDNN primitive creation)
            t0 = time.perf_counter()
            F.conv3d(x, w)
            rows[f"{layout}/{str(dtype)[6:]}"] = time.perf_counter() - t0
    for layout in ("contiguous", "channels_last_3d"):
        ratio = rows[f"{layout}/bfloat16"] / rows[f"{layout}/float32"]
        rows[f"{layout}/bf16_over_fp32"] = ratio
        print(f"{layout:17s} fp32 {rows[f'{layout}/float32']:.3f} s  bf16 {rows[f'{layout}/bfloat16']:.3f} s  "
              f"bf16/fp32 {ratio:.1f}x")
    doc = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__},
           "seconds": rows}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
