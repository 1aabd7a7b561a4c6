"""Forward benchmark of the released rflow-ct UNet (alone and ControlNet + UNet): ours (fp32 / bf16) vs MONAI, CPU.

Every case runs in its own subprocess (its peak RSS is its own); cases are interleaved ours/MONAI so that
the ratios, not the absolute times, are the result on a shared machine. Run by hand, e.g.
    PYTHONPATH=src python3 benchmarks/unet.py                       # 4x32^3 and 4x16^3, all cases
    PYTHONPATH=src python3 benchmarks/unet.py --latents 16 --repeats 5 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

IMPLS = ("monai", "ours", "ours-cl", "ours-bf16")
NETS = ("unet", "cn+unet")


def _monai_nets(cfg, ccfg):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from test_unet_monai import (  # the reference builders of the equivalence tests
        monai_controlnet,
        monai_unet,
    )

    return monai_unet(cfg).eval(), monai_controlnet(cfg, ccfg).eval()


def _prepare(folder: str) -> None:
    """Random non-zero weights (scaled 1/sqrt(fan_in), zero-initialised layers included) for both nets."""
    import torch
    from safetensors.torch import save_file

    from maisi.config import ControlNetConfig, preset

    unet, cn = _monai_nets(preset("rflow-ct").unet, ControlNetConfig())
    for seed, net, name in ((0, unet, "unet"), (1, cn, "controlnet")):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 10
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(folder, f"{name}.safetensors"))


def _child(args) -> None:
    import torch
    from safetensors.torch import load_file

    from maisi.config import ControlNetConfig, preset
    from maisi.networks.controlnet import ControlNet, mask_to_bit_planes
    from maisi.networks.precision import for_inference
    from maisi.networks.unet import DiffusionUNet

    torch.set_num_threads(args.threads)
    impl, net, s = args.child, args.net, args.latent
    cfg, ccfg = preset("rflow-ct").unet, ControlNetConfig()
    with_cn = net == "cn+unet"
    if impl == "monai":
        unet, cn = _monai_nets(cfg, ccfg)
    else:
        unet, cn = DiffusionUNet(cfg).eval(), ControlNet(cfg, ccfg).eval()
    unet.load_state_dict(load_file(os.path.join(args.folder, "unet.safetensors")), strict=True)
    if with_cn:
        cn.load_state_dict(load_file(os.path.join(args.folder, "controlnet.safetensors")), strict=True)
    else:
        cn = None
    if impl in ("ours-cl", "ours-bf16"):  # fp32 channels_last_3d; bf16 weights (fp32 GroupNorm) + channels_last_3d
        for m in (unet, cn):
            if m is not None:
                for_inference(m, torch.bfloat16 if impl == "ours-bf16" else torch.float32, channels_last=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, s, s, s, generator=g)
    t = torch.tensor([500.0])
    spacing, modality = torch.tensor([[1.5, 1.5, 2.0]]), torch.tensor([1])
    mask = torch.randint(0, 133, (1, 1, 4 * s, 4 * s, 4 * s), generator=g, dtype=torch.uint8)

    def forward():
        if impl == "monai":
            kw = {}
            if cn is not None:
                down, mid = cn(x, t, mask_to_bit_planes(mask), class_labels=modality)
                kw = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            return unet(x, t, spacing_tensor=spacing * 100, class_labels=modality, **kw)
        kw = {}
        if cn is not None:
            down, mid = cn(x, t, mask, modality=modality)
            kw = {"down_residuals": down, "mid_residual": mid}
        return unet(x, t, spacing=spacing, modality=modality, **kw)

    times = []
    with torch.no_grad():
        out = forward()  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = forward()
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(out.float().contiguous(), args.out)
    print(json.dumps({"wall_s": statistics.median(times), "peak_gb": peak / 1024**2}))


def _run(args, impl: str, net: str, latent: int, folder: str) -> dict:
    out = os.path.join(folder, f"{impl}-{net}-{latent}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--net", net, "--latent", str(latent),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--folder", folder, "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{impl} {net} {latent}: {res.stderr.strip()[-2000:]}")
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "out": out}


def _compare(a: str, b: str) -> tuple[float, float, float]:
    """(max abs diff, relative L2 error, max |reference|) of output a against reference b."""
    import torch

    x, y = torch.load(a), torch.load(b)
    return float((x - y).abs().max()), float((x - y).norm() / y.norm()), float(y.abs().max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latents", default="32,16", help="comma list of latent edges (4 channels, batch 1)")
    p.add_argument("--nets", default=",".join(NETS), help=f"comma list from {NETS}")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per case after one warm-up (median)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median over rounds)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--net", choices=NETS, help=argparse.SUPPRESS)
    p.add_argument("--latent", type=int, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.prepare:
        _prepare(args.folder)
        return 0
    if args.child:
        _child(args)
        return 0
    latents = [int(v) for v in args.latents.split(",")]
    nets = [n for n in args.nets.split(",") if n]
    if bad := [n for n in nets if n not in NETS]:
        p.error(f"unknown nets {bad}; choose from {NETS}")
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare", "--folder", folder], check=True)
        rows: dict[tuple, list[dict]] = {}
        for r in range(args.rounds):
            for latent in latents:
                for net in nets:
                    for impl in IMPLS:  # interleaved: each round runs MONAI and ours back to back
                        rows.setdefault((latent, net, impl), []).append(_run(args, impl, net, latent, folder))
                        row = rows[(latent, net, impl)][-1]
                        print(f"# round {r + 1} {net:8s} 4x{latent}^3 {impl:10s} {row['wall_s']:7.2f} s "
                              f"{row['peak_gb']:5.2f} GB", flush=True)
        print(f"\nrflow-ct, batch 1, {args.threads} threads, median of {args.repeats} after a warm-up, "
              f"{args.rounds} round(s)")
        print(f"{'net':8s} {'latent':>7s} {'impl':10s} {'time s':>7s} {'peak GB':>7s} {'ours/MONAI':>10s} "
              f"{'max|diff|':>10s} {'rel err':>9s}")
        for latent in latents:
            for net in nets:
                ref = rows[(latent, net, "monai")]
                fp32 = rows[(latent, net, "ours")]
                for impl in IMPLS:
                    case = rows[(latent, net, impl)]
                    wall = statistics.median(c["wall_s"] for c in case)
                    ratio = statistics.median(c["wall_s"] / m["wall_s"] for c, m in zip(case, ref))
                    against = fp32 if impl == "ours-bf16" else ref  # fp32 vs MONAI; bf16 vs our fp32
                    diff, rel, _ = _compare(case[-1]["out"], against[-1]["out"])
                    extra = "" if impl == "monai" else f"{diff:10.2e} {rel:9.2e}"
                    print(f"{net:8s} {f'4x{latent}^3':>7s} {impl:10s} {wall:7.2f} {max(c['peak_gb'] for c in case):7.2f} "
                          f"{ratio:10.2f} {extra}")
                print(f"{'':8s} {'':7s} (max |MONAI output| = {_compare(ref[-1]['out'], ref[-1]['out'])[2]:.3g}; "
                      "diffs vs MONAI, ours-bf16's vs ours fp32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
