"""`maisi info`: version, presets, label vocabulary and modality codes."""

from __future__ import annotations

import argparse
import json

from maisi import __version__
from maisi.config import PRESETS, to_dict


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show presets, labels and modality codes")
    p.add_argument("what", nargs="?", choices=["presets", "labels", "modalities"], default="presets")
    p.add_argument("--preset", help="print the full JSON config of one preset")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from maisi import labels

    if args.preset:
        from maisi.config import preset

        print(json.dumps(to_dict(preset(args.preset)), indent=2))
        return 0
    if args.what == "presets":
        print(f"maisi {__version__}; presets:")
        for name, cfg in PRESETS.items():
            print(
                f"  {name:15s} unet channels {list(cfg.unet.channels)}, scheduler {cfg.scheduler.kind} "
                f"({cfg.scheduler.num_inference_steps} steps), image sizes multiple of {cfg.image_divisor}"
            )
    elif args.what == "labels":
        for label_id, name in sorted(labels.id_to_name().items()):
            print(f"{label_id:4d}  {name}")
    else:
        for name, code in sorted(labels.MODALITIES.items(), key=lambda kv: kv[1]):
            print(f"{code:4d}  {name}")
    return 0
