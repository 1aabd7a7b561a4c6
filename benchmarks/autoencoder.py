"""Encode/decode benchmark of the released autoencoder layout: ours (unsplit / split / streaming, fp32 and
bf16) against MONAI, CPU.

Each case runs in its own subprocess so that its peak RSS (ru_maxrss) is its own; the streaming cases run the
plan `plan_memory` picks within --memory-gb (it must be streaming) and report its estimated peak next to the
measured one. Results go to benchmarks/results/ as JSON. Run by hand, e.g.
    PYTHONPATH=src python3 benchmarks/autoencoder.py --latent 32 --splits 4
    PYTHONPATH=src python3 benchmarks/autoencoder.py --latent 32 --splits 8 --repeats 3   # ratios robust to noise
    PYTHONPATH=src python3 benchmarks/autoencoder.py --streaming --latent 64 --splits 32 --memory-gb 3
    PYTHONPATH=src python3 benchmarks/autoencoder.py --cases ours-stream --shape 96 96 64 --memory-gb 8
    PYTHONPATH=src python3 benchmarks/autoencoder.py --op encode --cases ours-stream --shape 128 128 64 --memory-gb 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CASES = ("monai", "monai-split", "ours", "ours-split", "ours-bf16", "ours-split-bf16", "ours-stream",
         "ours-stream-bf16")
STREAMING = ("ours-split", "ours-stream", "ours-split-bf16", "ours-stream-bf16")


def _child(case: str, op: str, shape: list[int], splits: int, out: str, threads: int, weights: str,
           memory_gb: float | None) -> None:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if case.startswith("monai"):
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

        model = AutoencoderKlMaisi(
            spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[64, 128, 256],
            num_res_blocks=[2, 2, 2], norm_num_groups=32, norm_eps=1e-6, attention_levels=[False] * 3,
            with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
            num_splits=splits if case == "monai-split" else 1, dim_split=1, norm_float16=False,
        ).eval()
    else:
        from maisi.config import AutoencoderConfig
        from maisi.networks.autoencoder import Autoencoder

        model = Autoencoder(AutoencoderConfig()).eval()
    model.load_state_dict(load_file(weights), strict=True)  # the same random weights in every case
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, *shape, generator=gen) if op == "decode" else torch.rand(1, 1, *shape, generator=gen)
    fn = model.decode if op == "decode" else (lambda v, **kw: model.encode(v, **kw)[0])
    extra = {}
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    if case.startswith("ours-stream"):
        from maisi.networks.memory import plan_memory

        plan = plan_memory(model, op, tuple(x.shape), memory_gb, dtype=dtype)
        if plan.kind != "streaming":
            raise SystemExit(f"--memory-gb {memory_gb} gives a {plan.kind} plan; lower it to benchmark streaming")
        extra = {"plan": plan.describe(), "estimated_gb": plan.estimated_gb}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.no_grad():
        if case.startswith("monai"):
            res = fn(x)
        elif case.startswith("ours-stream"):
            res = fn(x, stream=plan.stream(dtype))
        else:
            res = fn(x, num_splits=1 if case in ("ours", "ours-bf16") else splits, split_axis=1, dtype=dtype)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(res.float().contiguous(), out)
    print(json.dumps({"wall_s": wall, "peak_gb": peak / 1024**2, "base_gb": base / 1024**2, **extra}))


def _run_case(args, case: str, folder: str) -> dict:
    out = os.path.join(folder, f"{case}.pt")
    splits = args.monai_splits if case == "monai-split" and args.monai_splits else args.splits
    cmd = [sys.executable, __file__, "--child", case, "--op", args.op, "--shape", *map(str, args.shape),
           "--splits", str(splits), "--threads", str(args.threads), "--out", out,
           "--weights", os.path.join(folder, "weights.safetensors")]
    if args.memory_gb:
        cmd += ["--memory-gb", str(args.memory_gb)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
    if res.returncode:
        return {"case": case, "error": res.stderr.strip().splitlines()[-1:]}
    row = json.loads(res.stdout.strip().splitlines()[-1])
    return {"case": case, "out": out, **row}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", choices=("decode", "encode"), default="decode")
    p.add_argument("--latent", type=int, default=32, help="latent edge (output edge is 4x) of a cube")
    p.add_argument("--shape", type=int, nargs=3, help="input shape instead of --latent: the latent (decode) or the "
                   "image (encode)")
    p.add_argument("--streaming", action="store_true", help=f"the cases {STREAMING} (unless --cases)")
    p.add_argument("--memory-gb", type=float, help="budget of the streaming cases")
    p.add_argument("--json", help="results file (default benchmarks/results/autoencoder_<op>_<shape>.json)")
    p.add_argument("--splits", type=int, default=4, help="num_splits for the split cases (axis 1)")
    p.add_argument("--monai-splits", type=int, help="num_splits of MONAI's split case (default: --splits; "
                   "the released configs use 8 (v1) and 4 (v2))")
    p.add_argument("--cases", help=f"comma list from {CASES} (default: all but the streaming ones)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of all cases (order rotated); wall = median, ratio = median of per-round ratios")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.shape:
        args.shape = [args.latent * (4 if args.op == "encode" else 1)] * 3
    if args.child:
        _child(args.child, args.op, args.shape, args.splits, args.out, args.threads, args.weights, args.memory_gb)
        return 0
    import torch

    cases = [c for c in (args.cases or ",".join(STREAMING if args.streaming else CASES[:5])).split(",") if c]
    if any(c.startswith("ours-stream") for c in cases) and not args.memory_gb:
        p.error("the streaming cases need --memory-gb")
    print(f"{args.op} {'x'.join(map(str, args.shape))}, splits={args.splits} (MONAI's split case: "
          f"{args.monai_splits or args.splits}; axis 1), threads={args.threads}, budget {args.memory_gb} GB")
    with tempfile.TemporaryDirectory() as folder:
        from safetensors.torch import save_file

        from maisi.config import AutoencoderConfig
        from maisi.networks.autoencoder import Autoencoder

        torch.manual_seed(0)  # released layout, PyTorch default init
        save_file(Autoencoder(AutoencoderConfig()).state_dict(), os.path.join(folder, "weights.safetensors"))
        rounds: list[dict[str, dict]] = []
        for k in range(args.repeats):  # sequential: one case in memory at a time; order rotated each round
            order = cases[k % len(cases):] + cases[:k % len(cases)]
            rounds.append({})
            for case in order:
                r = rounds[-1][case] = _run_case(args, case, folder)
                print(f"  round {k + 1} {case:12s} " + (f"{r['wall_s']:7.1f} s  peak RSS {r['peak_gb']:.2f} GB"
                      f" (before decode {r['base_gb']:.2f} GB)" if "error" not in r else str(r["error"])), flush=True)
        ok = {}
        for case in cases:
            runs = [rd[case] for rd in rounds if "error" not in rd[case]]
            if runs:
                ok[case] = {**runs[-1], "wall_s": statistics.median(r["wall_s"] for r in runs),
                            "peak_gb": max(r["peak_gb"] for r in runs)}

        def ratio(case: str) -> float:  # median over rounds of (case wall / MONAI unsplit wall) in that round
            return statistics.median(rd[case]["wall_s"] / rd["monai"]["wall_s"] for rd in rounds
                                     if "error" not in rd[case] and "error" not in rd["monai"])
        # reference: our unsplit fp32 output, else our exact split one, else MONAI's
        ref_case = next((c for c in ("ours", "ours-split", "monai", "monai-split") if c in ok), None)
        ref = torch.load(ok[ref_case]["out"]) if ref_case else None
        print(f"\n{'case':12s} {'wall s':>8s} {'peak GB':>8s} {'max|diff| vs ' + str(ref_case):>22s} {'PSNR dB':>8s}")
        for case, r in ok.items():
            diff, psnr = "", ""
            if ref is not None and case != ref_case:
                img = torch.load(r["out"])
                d = (img - ref).abs().max().item()
                mse = (img - ref).square().mean().item()
                rng = (ref.max() - ref.min()).item()
                diff = f"{d:.2e}"
                psnr = f"{10 * math.log10(rng * rng / mse):.1f}" if mse > 0 else "inf"
            print(f"{case:12s} {r['wall_s']:8.1f} {r['peak_gb']:8.2f} {diff:>22s} {psnr:>8s}")
        summary = {}
        for stream_case, split_case in (("ours-stream", "ours-split"), ("ours-stream-bf16", "ours-split-bf16")):
            if stream_case in ok and split_case in ok:
                rs = statistics.median(rd[stream_case]["wall_s"] / rd[split_case]["wall_s"] for rd in rounds
                                       if "error" not in rd[stream_case] and "error" not in rd[split_case])
                a, b = torch.load(ok[stream_case]["out"]), torch.load(ok[split_case]["out"])
                summary[stream_case] = {"wall_vs_in_memory_split": rs, "peak_gb": ok[stream_case]["peak_gb"],
                                        "estimated_gb": ok[stream_case].get("estimated_gb"),
                                        "max_abs_diff_vs_in_memory_split": (a - b).abs().max().item(),
                                        "output_range": (b.max() - b.min()).item()}
                print(f"  {stream_case}: wall {rs:.2f}x the in-memory split, peak {ok[stream_case]['peak_gb']:.2f} GB "
                      f"(estimated {ok[stream_case].get('estimated_gb', 0):.2f}), max|diff| vs split "
                      f"{summary[stream_case]['max_abs_diff_vs_in_memory_split']:.2e}")
        monai = [ok[c] for c in ("monai", "monai-split") if c in ok]
        if monai:
            best_mem = min(m["peak_gb"] for m in monai)
            print(f"\nratios vs MONAI (best peak {best_mem:.2f} GB" +
                  (f", unsplit wall {ok['monai']['wall_s']:.1f} s; wall ratio = median over {len(rounds)} round(s))"
                   if "monai" in ok else ")"))
            for case in ("ours", "ours-split", "ours-bf16"):
                if case in ok:
                    r = ok[case]
                    t = f"  wall {ratio(case):.2f}x" if "monai" in ok else ""
                    print(f"  {case:12s} peak {r['peak_gb'] / best_mem:.2f}x{t}")
                    summary.setdefault("vs_monai", {})[case] = {
                        "peak": r["peak_gb"] / best_mem, **({"wall": ratio(case)} if "monai" in ok else {})}
        _write(args, rounds, ok, summary)
    return 0


def _write(args, rounds: list[dict], ok: dict, summary: dict) -> None:
    import platform

    import torch

    path = args.json or os.path.join(os.path.dirname(__file__), "results",
                                     f"autoencoder_{args.op}_{'x'.join(map(str, args.shape))}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    strip = lambda r: {k: v for k, v in r.items() if k != "out"}  # noqa: E731
    doc = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": {
        "cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
        "processor": platform.processor(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "python": platform.python_version()},
        "op": args.op, "shape": args.shape, "splits": args.splits, "memory_gb": args.memory_gb,
        "cases": {c: strip(r) for c, r in ok.items()}, "rounds": [{c: strip(r) for c, r in rd.items()} for rd in rounds],
        "summary": summary}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
