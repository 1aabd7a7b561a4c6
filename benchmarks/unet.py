"""Forward benchmark of the released rflow-ct UNet (alone and ControlNet + UNet): ours (fp32 / bf16) vs MONAI, CPU.

Timings: all implementations in one process, forward by forward in turn, so that the ratios, not the
absolute times, are the result on a shared machine. Peak RSS and outputs: one subprocess per implementation. Run by hand, e.g.
    PYTHONPATH=src python3 benchmarks/unet.py                       # 4x32^3 and 4x16^3, all cases
    PYTHONPATH=src python3 benchmarks/unet.py --latents 16 --repeats 5
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


def _build(impl: str, with_cn: bool, folder: str):
    import torch
    from safetensors.torch import load_file

    from maisi.config import ControlNetConfig, preset
    from maisi.networks.controlnet import ControlNet
    from maisi.networks.precision import for_inference
    from maisi.networks.unet import DiffusionUNet

    cfg, ccfg = preset("rflow-ct").unet, ControlNetConfig()
    unet, cn = _monai_nets(cfg, ccfg) if impl == "monai" else (DiffusionUNet(cfg).eval(), ControlNet(cfg, ccfg).eval())
    unet.load_state_dict(load_file(os.path.join(folder, "unet.safetensors")), strict=True)
    cn.load_state_dict(load_file(os.path.join(folder, "controlnet.safetensors")), strict=True) if with_cn else None
    cn = cn if with_cn else None
    if impl in ("ours-cl", "ours-bf16"):  # fp32 channels_last_3d; bf16 weights (fp32 GroupNorm) + channels_last_3d
        for m in (unet, cn):
            if m is not None:
                for_inference(m, torch.bfloat16 if impl == "ours-bf16" else torch.float32, channels_last=True)
    return unet, cn


def _forward(impl: str, unet, cn, s: int):
    import torch

    from maisi.networks.controlnet import mask_to_bit_planes

    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, s, s, s, generator=g)
    t, spacing, modality = torch.tensor([500.0]), torch.tensor([[1.5, 1.5, 2.0]]), torch.tensor([1])
    mask = torch.randint(0, 133, (1, 1, 4 * s, 4 * s, 4 * s), generator=g, dtype=torch.uint8)
    with torch.no_grad():
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


def _child(args) -> None:
    """--child IMPL: one forward of one implementation, for its peak RSS and its output.
    --child all: every implementation in one process, timed forward by forward in turn (the ratios)."""
    import torch

    torch.set_num_threads(args.threads)
    with_cn = args.net == "cn+unet"
    if args.child != "all":
        unet, cn = _build(args.child, with_cn, args.folder)
        out = _forward(args.child, unet, cn, args.latent)
        torch.save(out.float().contiguous(), args.out)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"peak_gb": peak / 1024**2}))
        return
    nets = {impl: _build(impl, with_cn, args.folder) for impl in IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(args.repeats + 1):  # round 0 is the warm-up
        for impl in IMPLS[r % 2:] + IMPLS[:r % 2]:  # interleaved, starting order rotated
            t0 = time.perf_counter()
            _forward(impl, *nets[impl], args.latent)
            if r:
                times[impl].append(time.perf_counter() - t0)
    print(json.dumps(times))


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
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per implementation after a warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=(*IMPLS, "all"), help=argparse.SUPPRESS)
    p.add_argument("--net", choices=NETS, help=argparse.SUPPRESS)
    p.add_argument("--latent", type=int, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "unet.json"),
                   help="results file")
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
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare", "--folder", folder], check=True)
        print(f"rflow-ct, batch 1, {args.threads} threads; time: median of {args.repeats} forwards after a warm-up, "
              "all implementations in one process, interleaved forward by forward; ratio: median of the per-round "
              "ratios; peak: RSS of a separate process per implementation (one forward)", flush=True)
        print(f"{'net':8s} {'latent':>7s} {'impl':10s} {'time s':>7s} {'vs MONAI':>8s} {'peak GB':>7s} "
              f"{'max|diff|':>10s} {'rel err':>9s}", flush=True)
        for latent in latents:
            for net in nets:
                mem = {impl: _run(args, impl, net, latent, folder) for impl in IMPLS}
                res = _run(args, "all", net, latent, folder)
                ref_max = _compare(mem["monai"]["out"], mem["monai"]["out"])[2]
                for impl in IMPLS:
                    wall = statistics.median(res[impl])
                    ratio = statistics.median(a / b for a, b in zip(res[impl], res["monai"]))
                    against = mem["ours" if impl == "ours-bf16" else "monai"]  # fp32 vs MONAI; bf16 vs our fp32
                    diff, rel, _ = _compare(mem[impl]["out"], against["out"])
                    extra = "" if impl == "monai" else f"{diff:10.2e} {rel:9.2e}"
                    print(f"{net:8s} {f'4x{latent}^3':>7s} {impl:10s} {wall:7.2f} {ratio:8.2f} "
                          f"{mem[impl]['peak_gb']:7.2f} {extra}", flush=True)
                    rows.append({"net": net, "latent": latent, "impl": impl, "wall_s": wall, "vs_monai": ratio,
                                 "peak_gb": mem[impl]["peak_gb"], "times_s": res[impl],
                                 **({} if impl == "monai" else {"max_abs_diff": diff, "rel_err": rel})})
                print(f"  (max |MONAI output| = {ref_max:.3g}; diffs vs MONAI, ours-bf16's vs ours fp32; "
                      f"times {json.dumps({k: [round(v, 2) for v in res[k]] for k in IMPLS})})", flush=True)
    _write(args, rows)
    return 0


def _write(args, rows: list[dict]) -> None:
    import platform

    import torch

    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    doc = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
           "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                       "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__},
           "rows": rows}
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    raise SystemExit(main())
