"""The `maisi` command line: one module per subcommand, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from maisi import __version__
from maisi.cli.flags import in_flags

# Subcommand modules under maisi.cli; each defines add_parser(subparsers) and run(args) -> int.
COMMANDS: list[str] = [
    "info",
    "generate",
    "demo",
    "phantom",
    "prepare",
    "train",
    "evaluate",
    "download",
    "serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maisi",
        description="MAISI: generate 3D CT volumes with anatomy masks; train, prepare data and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"maisi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"maisi.cli.{name.replace('-', '_')}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        module = sys.modules.get(f"maisi.cli.{args.command.replace('-', '_')}")
        message = in_flags(str(e), getattr(module, "PHRASES", {}), getattr(module, "LEADING", ()))
        print(f"maisi {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"maisi {args.command}: interrupted", file=sys.stderr)
        return 130
