"""Decode benchmark of the released autoencoder layout: ours (split / unsplit / bf16) against MONAI, CPU.

Each case runs in its own subprocess so that its peak RSS (ru_maxrss) is its own. Run by hand, e.g.
    PYTHONPATH=src python3 benchmarks/autoencoder.py --latent 32 --splits 4
    PYTHONPATH=src python3 benchmarks/autoencoder.py --latent 32 --splits 8 --repeats 3   # ratios robust to noise
    PYTHONPATH=src python3 benchmarks/autoencoder.py --latent 64 --cases ours-split,ours-bf16 --splits 32
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

CASES = ("monai", "monai-split", "ours", "ours-split", "ours-bf16")


def _child(case: str, latent: int, splits: int, out: str, threads: int, weights: str) -> None:
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
    z = torch.randn(1, 4, latent, latent, latent, generator=torch.Generator().manual_seed(1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.no_grad():
        if case.startswith("monai"):
            img = model.decode(z)
        else:
            kw = {"num_splits": splits if case != "ours" else 1, "split_axis": 1}
            if case == "ours-bf16":
                kw["dtype"] = torch.bfloat16
            img = model.decode(z, **kw)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(img.float().contiguous(), out)
    print(json.dumps({"wall_s": wall, "peak_gb": peak / 1024**2, "base_gb": base / 1024**2}))


def _run_case(args, case: str, folder: str) -> dict:
    out = os.path.join(folder, f"{case}.pt")
    splits = args.monai_splits if case == "monai-split" and args.monai_splits else args.splits
    cmd = [sys.executable, __file__, "--child", case, "--latent", str(args.latent), "--splits", str(splits),
           "--threads", str(args.threads), "--out", out, "--weights", os.path.join(folder, "weights.safetensors")]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
    if res.returncode:
        return {"case": case, "error": res.stderr.strip().splitlines()[-1:]}
    row = json.loads(res.stdout.strip().splitlines()[-1])
    return {"case": case, "out": out, **row}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=32, help="latent edge (output edge is 4x)")
    p.add_argument("--splits", type=int, default=4, help="num_splits for the split cases (axis 1)")
    p.add_argument("--monai-splits", type=int, help="num_splits of MONAI's split case (default: --splits; "
                   "the released configs use 8 (v1) and 4 (v2))")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list from {CASES}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of all cases (order rotated); wall = median, ratio = median of per-round ratios")
    p.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child, args.latent, args.splits, args.out, args.threads, args.weights)
        return 0
    import torch

    cases = [c for c in args.cases.split(",") if c]
    edge = 4 * args.latent
    print(f"decode 4x{args.latent}^3 -> {edge}^3, splits={args.splits} (MONAI's split case: "
          f"{args.monai_splits or args.splits}; axis 1), threads={args.threads}")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
