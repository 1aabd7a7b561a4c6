"""Where a decode's time goes: MONAI's AutoencoderKlMaisi and ours (in-memory split), released architecture, random
weights, CPU, under torch.profiler.

It answers one question: how much of a decode is the 3×3×3 convolutions themselves (oneDNN), which no
rearrangement of the same arithmetic can shorten. If the convolutions alone take more than a target share of
MONAI's whole decode, that target needs fewer floating-point operations, not better bookkeeping. Run by hand:
    PYTHONPATH=src python3 benchmarks/decode_profile.py --latent 16 --splits 4 --threads 1
Writes benchmarks/results/decode_profile_<edge>.json with each case's wall time and its top operators.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from maisi.config import AutoencoderConfig
from maisi.networks.autoencoder import Autoencoder

CONV_OPS = ("aten::mkldnn_convolution", "aten::slow_conv3d_forward")


def monai_model() -> torch.nn.Module:
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    return AutoencoderKlMaisi(
        spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[64, 128, 256],
        num_res_blocks=[2, 2, 2], norm_num_groups=32, norm_eps=1e-6, attention_levels=[False] * 3,
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, num_splits=1, dim_split=1,
        norm_float16=False,
    )


def run(case: str, z: torch.Tensor, splits: int, state: dict) -> dict:
    model = (monai_model() if case == "monai" else Autoencoder(AutoencoderConfig())).eval()
    model.load_state_dict(state, strict=True)
    decode = model.decode if case == "monai" else (lambda v: model.decode(v, num_splits=splits))
    with torch.no_grad():
        decode(z)  # warm-up: oneDNN primitives
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            decode(z)
            wall = time.perf_counter() - t0
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) / 1e6
    conv = sum(e.self_cpu_time_total for e in ops if e.key in CONV_OPS) / 1e6
    return {"wall_s": wall, "profiled_s": total, "conv_s": conv, "conv_share": conv / total,
            "top": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count}
                    for e in ops[:10]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=16, help="latent edge (the image is 4x)")
    p.add_argument("--splits", type=int, default=4, help="our in-memory split count")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="results file (default benchmarks/results/decode_profile_<edge>.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    state = Autoencoder(AutoencoderConfig()).state_dict()  # one set of random weights for both networks
    z = torch.randn(1, 4, args.latent, args.latent, args.latent, generator=torch.Generator().manual_seed(1))
    cases = {case: run(case, z, args.splits, state) for case in ("monai", "ours-split")}
    monai = cases["monai"]
    for name, c in cases.items():
        print(f"{name:11s} wall {c['wall_s']:6.2f} s  convolutions {c['conv_s']:6.2f} s "
              f"({100 * c['conv_share']:.0f} % of the profile)  wall / MONAI {c['wall_s'] / monai['wall_s']:.2f}")
    floor = cases["ours-split"]["conv_s"] / monai["wall_s"]
    print(f"our convolutions alone take {floor:.2f}x MONAI's whole decode")
    edge = 4 * args.latent
    doc = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__},
           "image": [edge] * 3, "splits": args.splits, "cases": cases,
           "summary": {"ours_split_wall_over_monai": cases["ours-split"]["wall_s"] / monai["wall_s"],
                       "ours_split_conv_over_monai_wall": floor}}
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"decode_profile_{edge}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
