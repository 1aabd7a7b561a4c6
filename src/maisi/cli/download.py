"""`maisi download`: fetch NVIDIA's released MAISI files from the Hugging Face hub into its cache."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download", help="download NVIDIA's released MAISI weights and mask database (Hugging Face hub)",
        description="Download a named set of NVIDIA's released MAISI files into the Hugging Face cache "
                    "($HF_HOME/hub), checking each file's sha256 against the one recorded at first download. "
                    "HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN are honoured. See docs/released-models.md.")
    p.add_argument("sets", nargs="*", metavar="SET", help="one or more named sets: rflow-ct, ddpm-ct, mask-ct, rflow-mr, rflow-mr-brain, all (see --list)")
    p.add_argument("--revision", action="append", default=[], metavar="REV",
                   help="branch, tag or commit of every repository, or REPO=REV for one repository "
                        "(repeatable; e.g. nvidia/NV-Generate-CT=<commit> to pin); default main")
    p.add_argument("--token", help="Hugging Face token (default: $HF_TOKEN or the stored `hf auth login`)")
    p.add_argument("--list", action="store_true", help="list the sets, their files and sizes; download nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def parse_revisions(values: Sequence[str]) -> str | dict[str, str] | None:
    """--revision values -> one revision for all repositories, or {repo: revision}."""
    if not values:
        return None
    pairs = [v.partition("=") for v in values]
    if all(not sep for _, sep, _ in pairs):
        if len(values) > 1:
            raise ValueError(f"--revision given twice without REPO= ({list(values)}); use REPO=REV for each")
        return values[0]
    if not all(sep and repo and rev for repo, sep, rev in pairs):
        raise ValueError(f"--revision values {list(values)} mix REV and REPO=REV; use REPO=REV for each")
    return {repo: rev for repo, _, rev in pairs}


def _size(mb: float | None) -> str:
    if mb is None:
        return "size not known"
    return f"~{mb / 1000:.1f} GB" if mb >= 1000 else f"~{mb:.0f} MB"


def _list(names: Sequence[str]) -> None:
    from maisi.io.hub import released_set

    for name in names:
        rs = released_set(name)
        unknown = sum(f.approx_mb is None for f in rs.files)
        more = f" + {unknown} file(s) of unknown size" if unknown else ""
        print(f"{rs.name}: {rs.description} ({_size(rs.approx_mb)}{more})")
        for f in rs.files:
            print(f"  {f.repo:28s} {f.path:60s} {f.component:16s} {_size(f.approx_mb)}")


def run(args: argparse.Namespace) -> int:
    from maisi.io.hub import SETS, download_set, released_set, snapshot_commit

    for name in args.sets:
        released_set(name)  # unknown names fail before any download
    if args.list:
        _list(args.sets or [n for n in SETS if n != "all"])
        return 0
    if not args.sets:
        raise ValueError(f"name at least one set to download: {', '.join(SETS)} (or --list to see them)")
    revision = parse_revisions(args.revision)
    for name in args.sets:
        paths = download_set(name, revision=revision, token=args.token, progress=not args.quiet)
        rs = released_set(name)
        print(f"{name}: {len(paths)} files, sha256 checked")
        commits: dict[str, str] = {}
        for f in rs.files:
            commits.setdefault(f.repo, snapshot_commit(paths[f.path], f))
            print(f"  {paths[f.path]}")
        pins = " ".join(f"--revision {repo}={commit}" for repo, commit in commits.items())
        print(f"  to get exactly these files again: maisi download {name} {pins}")
    return 0


PHRASES = {"give a token": "give --token"}  # the library's words -> the flag (maisi.cli.flags)
