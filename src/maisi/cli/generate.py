"""`maisi generate`: synthetic CT volumes (+ label maps, previews, records) from the demo or released models."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from maisi.cli import flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate CT volumes with label maps, previews and JSON records",
                       description="Generate synthetic CT. Without --weights the small demo model shipped with "
                                   "maisi is used (trained on phantoms: phantom-like images, not real CT).")
    p.add_argument("--out", type=Path, default=Path("generated"), help="output folder (default ./generated)")
    p.add_argument("--body-region", nargs="+", default=[], metavar="REGION",
                   help="head_neck, chest, abdomen, pelvis, or a span: 'chest abdomen' (default: the model's)")
    p.add_argument("--size", type=int, nargs="+", metavar="N", help="output size in voxels, 1 or 3 values")
    p.add_argument("--spacing", type=float, nargs="+", metavar="MM", help="voxel spacing in mm, 1 or 3 values")
    p.add_argument("--modality", help="modality name or code (default: the model's, CT)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1, help="samples denoised together (does not change them)")
    p.add_argument("--seed", type=int, default=0, help="sample k uses seed + k")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, 30 for rectified flow)")
    p.add_argument("--sampler", choices=["rflow", "ddpm", "ddim"], help="default: the schedule the model was trained with")
    p.add_argument("--timesteps", choices=["reference", "clean"],
                   help="rectified-flow timesteps: reference = NVIDIA's (float16, int() truncation; reproduces their "
                        "outputs), clean = exact; default: reference for NVIDIA's .pt files, the config's otherwise")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (0: off; default: the model's)")
    p.add_argument("--anatomy", nargs="+", default=[], metavar="NAME",
                   help="organs the mask must contain (MAISI vocabulary names, e.g. liver 'left kidney')")
    p.add_argument("--mask", help="your label map (NIfTI, NRRD or DICOM folder); resampled (nearest) to the output grid")
    p.add_argument("--image-output-ext", default=".nii.gz",
                   help="image format, as the NIM names them: .nii.gz (default), .nii, .nrrd, or .dcm (a folder "
                        "holding a DICOM CT series)")
    p.add_argument("--label-output-ext", default=".nii.gz",
                   help="label format: .nii.gz (default), .nii, .nrrd, or .dcm (a DICOM SEG label map)")
    p.add_argument("--mask-mapping", help="JSON {your label name or id: MAISI name or id} to convert --mask")
    p.add_argument("--mask-database",
                   help="folder of label maps + index.json, or NVIDIA's database (candidate_masks_*.json, or its folder, "
                        "beside all_masks_*/ or all_masks_*.zip); default: NVIDIA's when `maisi download` brought it "
                        "and the weights are NVIDIA's, else the built-in phantom masks")
    p.add_argument("--no-mask", action="store_true", help="image-only generation (no ControlNet)")
    p.add_argument("--tumor", nargs="+", default=[], metavar="NAME",
                   help="inpaint a tumour into its host organ: 'hepatic tumor', 'lung tumor', 'pancreatic tumor', ...")
    p.add_argument("--anatomy-size", nargs="+", default=[], metavar="NAME=SIZE",
                   help="generate a new mask with the mask generation model, sizes in [0, 1] (a percentile; -1: "
                        "don't care): gallbladder, liver, stomach, pancreas, colon and at most one of 'lung tumor', "
                        "'pancreatic tumor', 'hepatic tumor', 'colon cancer primaries', 'bone lesion'; e.g. liver=0.7 "
                        "'pancreatic tumor=0.3'. Needs weights with a mask model")
    p.add_argument("--anatomy-conditions", metavar="JSON",
                   help="conditions file completing --anatomy-size (all_anatomy_size_conditions.json layout; default: "
                        "the one beside the mask model's weights)")
    p.add_argument("--mask-sampler", choices=["ddpm", "ddim", "rflow"],
                   help="mask model sampler (default: the model's; ddpm/ddim for NVIDIA's, rflow for maisi's mask-tiny)")
    p.add_argument("--mask-steps", type=int, help="mask model sampling steps (default: the model's, 1000 for NVIDIA's)")
    p.add_argument("--mask-guidance", type=float, metavar="S",
                   help="classifier-free guidance on the sizes, 0..20 (default: the model's; 0, none, for NVIDIA's)")
    p.add_argument("--weights", nargs="+", metavar="PATH",
                   help="a maisi model folder, or NVIDIA's files (autoencoder, diffusion unet, controlnet .pt; "
                        "mask_generation_autoencoder.pt and mask_generation_diffusion_unet.pt for --anatomy-size)")
    p.add_argument("--config", help="preset or JSON config for released .pt files (default rflow-ct / ddpm-ct)")
    p.add_argument("--memory-gb", type=float, help="memory budget of the VAE decoder (picks tensor splitting)")
    p.add_argument("--quality-retries", type=int, default=2,
                   help="attempts added when the quality check fails: attempt a uses seed + a*2^28 and the a-th "
                        "ranked database mask (default 2)")
    p.add_argument("--no-quality-check", action="store_true")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="compute precision of the UNet, ControlNet and VAE decoder (GroupNorm and the sampler "
                        "steps stay fp32): bf16 on CPUs with AVX-512 BF16/AMX and GPUs, fp16 on GPUs (default fp32)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def parse_anatomy_size(items: list[str]) -> tuple[tuple[str, float], ...]:
    """["liver=0.7", "pancreatic tumor=0.3"] -> (("liver", 0.7), ("pancreatic tumor", 0.3)); names and ranges are
    checked by the pipeline."""
    pairs = []
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"--anatomy-size {item!r}: give NAME=SIZE, e.g. liver=0.7 or 'hepatic tumor=0.3'")
        try:
            pairs.append((name.strip(), float(value)))
        except ValueError:
            raise ValueError(f"--anatomy-size {item!r}: the size must be a number in [0, 1] or -1") from None
    return tuple(pairs)


def request_from_args(args: argparse.Namespace):
    from maisi.pipeline.validation import GenerationRequest

    return GenerationRequest(
        body_region=tuple(args.body_region), size=tuple(args.size) if args.size else None,
        spacing=tuple(args.spacing) if args.spacing else None, modality=args.modality,
        num_samples=args.num_samples, seed=args.seed, steps=args.steps, sampler=args.sampler,
        guidance=args.guidance, anatomy=tuple(args.anatomy), mask=args.mask, mask_mapping=args.mask_mapping,
        mask_source="none" if args.no_mask else "auto", mask_database=args.mask_database, tumor=tuple(args.tumor),
        batch_size=args.batch_size, memory_gb=args.memory_gb, quality_retries=args.quality_retries,
        quality_check=not args.no_quality_check, timesteps=args.timesteps,
        image_output_ext=args.image_output_ext, label_output_ext=args.label_output_ext,
        anatomy_size=parse_anatomy_size(args.anatomy_size), anatomy_conditions=args.anatomy_conditions,
        mask_sampler=args.mask_sampler, mask_steps=args.mask_steps, mask_guidance=args.mask_guidance,
    )


# How the library's messages name GenerationRequest fields -> the flags that set them (phrases, longest first)
PHRASES = {
    "mask, mask_database, anatomy, tumor or mask_source='none'": "--mask, --mask-database, --anatomy, --tumor or "
                                                                 "--no-mask",
    "mask, anatomy and tumor": "--mask, --anatomy and --tumor", "(mask, anatomy, tumor)": "(--mask, --anatomy, --tumor)",
    "mask_source='none'": "--no-mask", "mask_database": "--mask-database", "anatomy_size": "--anatomy-size",
    "mask_mapping": "--mask-mapping", "give weights with": "give --weights with",
    "anatomy_conditions": "--anatomy-conditions", "try spacing": "try --spacing", "a larger size": "a larger --size",
    "output folder (out)": "output folder (--out)", "device='cpu'": "--device cpu", "memory_gb": "--memory-gb",
    "mask_sampler": "--mask-sampler", "mask_steps": "--mask-steps", "mask_guidance": "--mask-guidance",
}
LEADING = ("mask", "timesteps", "anatomy", "tumor")  # a message that starts with the field's name


def in_flags(message: str) -> str:
    """A library message put in the user's words: the request fields it names become their flags."""
    return flags.in_flags(message, PHRASES, LEADING)


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:3]) + (" …" if len(paths) > 3 else "")


def run(args: argparse.Namespace) -> int:
    import torch

    from maisi.io.formats import OutputFormatError
    from maisi.pipeline.pipeline import Pipeline, world_from_env
    from maisi.pipeline.validation import check_files, earlier_outputs

    request = request_from_args(args)
    try:
        check_files(request, args.out)  # a bad --out, --mask or output format fails before any network loads
    except OutputFormatError as e:  # the field, in the words the user typed
        raise ValueError(str(e).replace(e.field, "--" + e.field.replace("_", "-"), 1)) from e
    rank, world = world_from_env()
    if world > 1 and torch.cuda.is_available() and args.device != "cpu":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    elif world > 1:
        torch.set_num_threads(max(1, (torch.get_num_threads()) // world))
    pipe = Pipeline.from_pretrained(args.weights, args.config, args.device, progress=not args.no_progress,
                                    precision=args.precision)
    plan = pipe.plan(request)  # every check before any compute; maisi.cli.main shows errors in flags (PHRASES)
    if rank == 0:
        for w in plan.warnings:
            print(f"maisi generate: warning: {in_flags(w)}", file=sys.stderr)
        replaced, beside = earlier_outputs(request, args.out)
        if replaced:
            print(f"maisi generate: warning: replacing {len(replaced)} file(s) of an earlier run in {args.out} "
                  f"({_names(list(replaced))}); give another --out or --seed to keep them", file=sys.stderr)
        if beside:
            print(f"maisi generate: warning: {len(beside)} file(s) of an earlier run of the same seeds stay in "
                  f"{args.out} beside the new ones ({_names(beside)}): they belong to the earlier samples",
                  file=sys.stderr)
    samples = pipe.generate(request, out=args.out, rank=rank, world_size=world, plan=plan,
                            on_event=lambda line: print(line, flush=True))  # one line per retry
    for s in samples:
        q = s.record["quality"].get("passed")
        status = {True: "quality check passed", False: "quality check FAILED (see record)", None: "no quality check"}[q]
        print(f"sample {s.index} (seed {s.seed}): {s.files['image']}  [{status}]")
    return 0
