"""GPU: exact decode of a 512×512×768 CT within a memory budget (streaming), and rectified-flow sampling cost.

Run by hand on a CUDA machine: `python benchmarks/gpu_large_volume.py --memory-gb 16`.
Released architectures with random weights. Prints times, peak GPU memory and ratios measured in
the same run (split vs unsplit, bf16 vs fp32, streaming vs the in-memory split, rectified flow vs DDPM
per step count), and writes them to benchmarks/results/gpu_large_volume.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from maisi.config import preset
from maisi.diffusion.sampling import make_noise, sample
from maisi.diffusion.schedulers import make_scheduler
from maisi.networks.autoencoder import Autoencoder
from maisi.networks.memory import estimate_peak, plan_memory
from maisi.networks.unet import DiffusionUNet


def timed(fn, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) / 2**30


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).pow(2).mean())
    rng = float(b.max() - b.min())
    return 10 * math.log10(rng**2 / mse) if mse > 0 else float("inf")


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--memory-gb", type=float, default=16.0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip-unet", action="store_true")
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "gpu_large_volume.json"))
    args = p.parse_args()
    res: dict = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "torch": torch.__version__,
                 "platform": platform.platform()}
    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = preset("rflow-ct")
    ae = Autoencoder(cfg.autoencoder).to(dev).eval().requires_grad_(False)
    print(f"device: {torch.cuda.get_device_name(dev)}")
    res["device"] = torch.cuda.get_device_name(dev)

    # 1. Exactness where unsplit fits: 256³ output (TF32 off: it rounds differently per segment shape).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    z = torch.randn(1, 4, 64, 64, 64, device=dev)
    ref, t_ref, m_ref = timed(lambda: ae.decode(z, num_splits=1), dev)
    split, t_split, m_split = timed(lambda: ae.decode(z, num_splits=8), dev)
    bf, t_bf, m_bf = timed(lambda: ae.decode(z, num_splits=8, dtype=torch.bfloat16), dev)
    print(f"256³ decode fp32 unsplit: {t_ref:.2f} s, peak {m_ref:.1f} GiB")
    print(f"256³ decode fp32 8 splits: {t_split:.2f} s, peak {m_split:.1f} GiB, max|diff| {float((split - ref).abs().max()):.2e}, "
          f"memory ratio {m_split / m_ref:.2f}, time ratio {t_split / t_ref:.2f}")
    print(f"256³ decode bf16 8 splits: {t_bf:.2f} s, peak {m_bf:.1f} GiB, PSNR vs fp32 {psnr(bf, ref):.1f} dB, "
          f"time ratio vs fp32 unsplit {t_bf / t_ref:.2f}")
    res["256"] = {"unsplit": {"s": t_ref, "gib": m_ref}, "split8": {"s": t_split, "gib": m_split,
                  "max_abs_diff": float((split - ref).abs().max())}, "bf16_split8": {"s": t_bf, "gib": m_bf,
                  "psnr_vs_fp32": psnr(bf, ref)}}
    del ref, split, bf

    # 2. 512×512×768 within the budget: the planner's plan (streaming: maps in host memory, tiles on the GPU),
    # against the in-memory split where the GPU can hold it.
    z = torch.randn(1, 4, 128, 128, 192, device=dev)
    free = torch.cuda.mem_get_info(dev)[0] / 2**30
    res["512x512x768"] = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype)[6:]
        plan = plan_memory(ae, "decode", tuple(z.shape), args.memory_gb, dtype=dtype, device=dev)
        out, t, m = timed(lambda d=dtype, pl=plan: ae.decode_within(z, args.memory_gb, dtype=d, plan=pl), dev)
        row = {"plan": plan.describe(), "s": t, "gib": m, "within_budget": m <= args.memory_gb}
        print(f"512×512×768 decode {name} within {args.memory_gb:.0f} GiB: {plan.describe()}: {t:.1f} s, "
              f"peak {m:.1f} GiB")
        need = min(estimate_peak(ae, "decode", tuple(z.shape), k, 0, dtype) for k in (32, 64, 128)) / 2**30
        if need < 0.9 * free:  # the in-memory split in the same run, for the time ratio and exactness
            ref, t2, m2 = timed(lambda d=dtype: ae.decode(z, num_splits=64, dtype=d), dev)
            row.update(split64={"s": t2, "gib": m2}, time_vs_split=t / t2,
                       max_abs_diff_vs_split=float((out - ref).abs().max()))
            print(f"  in-memory 64 splits: {t2:.1f} s, peak {m2:.1f} GiB; streaming takes {t / t2:.2f}x the time, "
                  f"max|diff| {row['max_abs_diff_vs_split']:.2e}")
            del ref
        res["512x512x768"][name] = row
        del out

    if args.skip_unet:
        return _write(args.json, res)
    # 3. Rectified flow at 512³ (latent 128³), bf16 autocast.
    unet = DiffusionUNet(cfg.unet).to(dev).eval().requires_grad_(False)
    shape = (4, 128, 128, 128)
    sched = make_scheduler(cfg.scheduler)
    sched.set_timesteps(args.steps, shape)
    cond = dict(spacing=torch.tensor([[1.0, 1.0, 1.0]], device=dev), modality=torch.tensor([1], device=dev))

    def denoiser(x, t):
        return unet(x, t, **cond)

    noise = make_noise(shape, [0], dev)
    _, t_rf, m_rf = timed(lambda: sample(denoiser, sched, noise, autocast=torch.bfloat16), dev)
    print(f"512³ rectified flow {args.steps} steps (bf16 autocast): {t_rf:.1f} s, peak {m_rf:.1f} GiB, "
          f"{t_rf / args.steps:.2f} s/step; a 1000-step DDPM would take ≈ {t_rf / args.steps * 1000:.0f} s "
          f"({1000 / args.steps:.0f}× longer)")
    res["rflow_512"] = {"steps": args.steps, "s": t_rf, "gib": m_rf}
    _write(args.json, res)


def _write(path: str, res: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
