"""`maisi serve`: the REST service (NVIDIA MAISI NIM routes plus a job queue) on uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve generation over HTTP (NVIDIA MAISI NIM routes plus a job queue)",
                       description="Serve MAISI generation over HTTP: the NIM's /v1/maisi/run and /v1/health/*, "
                                   "plus /v1/jobs (a bounded queue persisted in SQLite). Needs the `serve` extra: "
                                   "pip install 'maisi[serve]'.")
    p.add_argument("--weights", nargs="+", metavar="PATH",
                   help="a maisi model folder, or NVIDIA's files (default: the demo model shipped with maisi)")
    p.add_argument("--config", help="preset or JSON config for released .pt files")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="bearer token every route but /v1/health/* needs (default: the environment's "
                                   "MAISI_SERVE_TOKEN; none when unset)")
    p.add_argument("--work-dir", type=Path, default=Path("maisi-serve"),
                   help="jobs.sqlite and the job folders (default ./maisi-serve); a restart resumes its jobs")
    p.add_argument("--device", nargs="+", default=[], metavar="DEVICE",
                   help="one worker per device, e.g. cuda:0 cuda:1 (default: every GPU, else one CPU worker)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="the networks' precision when a request names none (default fp32)")
    p.add_argument("--queue-size", type=int, default=16, help="jobs queued or running at once (default 16)")
    p.add_argument("--max-samples", type=int, default=10, help="most samples one request may ask for (default 10)")
    p.add_argument("--max-upload-mb", type=float, default=256.0, help="largest request body (default 256 MB)")
    p.add_argument("--rate-limit", type=float, default=600.0,
                   help="requests per minute per client address, health routes excepted (default 600; 0: none)")
    p.add_argument("--max-restarts", type=int, default=2,
                   help="server restarts a job may survive (it resumes); past that it is marked failed (default 2)")
    p.add_argument("--nim-limits", choices=["auto", "on", "off"], default="auto",
                   help="the NIM's output_size/spacing limits (auto: on for NVIDIA's CT networks)")
    p.add_argument("--allow-local-dir", action="append", default=[], metavar="PATH",
                   help="a folder under which a request's local_working_dir may write its outputs (repeatable; "
                        "default none: the field is refused)")
    p.set_defaults(run=run)


def options_from_args(args: argparse.Namespace):
    from maisi.service.config import ServeOptions

    return ServeOptions(
        weights=tuple(args.weights) if args.weights else None, config=args.config, host=args.host, port=args.port,
        token=args.token or os.environ.get("MAISI_SERVE_TOKEN") or None, work_dir=args.work_dir,
        devices=tuple(args.device), precision=args.precision, queue_size=args.queue_size,
        max_samples=args.max_samples, max_upload_mb=args.max_upload_mb, rate_limit=args.rate_limit,
        max_restarts=args.max_restarts, nim_limits=args.nim_limits,
        local_dirs=tuple(str(Path(d).absolute()) for d in args.allow_local_dir),
    )


# How the library's messages name ServeOptions fields -> the flags that set them
PHRASES = {"work_dir": "--work-dir", "choose another port": "choose another --port"}


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from maisi.service.app import create_app
        from maisi.service.startup import start
    except ImportError as e:
        raise ValueError(f"maisi serve needs the `serve` extra ({e.name} is missing): pip install 'maisi[serve]'") from e
    options = options_from_args(args)
    started = start(options)  # weights, devices, port, work dir: a bad one is one line and exit 2, nothing left behind
    if options.host not in ("127.0.0.1", "localhost", "::1") and options.token is None:
        print(f"maisi serve: warning: listening on {options.host} without --token: anyone who reaches this "
              "address can use the service", file=sys.stderr)
    print(f"maisi serve: http://{options.host}:{options.port}  (work dir {options.work_dir}, "
          f"{'token required' if options.token else 'no token'})", flush=True)
    config = uvicorn.Config(create_app(options, lock=started.lock), host=options.host, port=options.port,
                            log_level="warning")
    try:
        uvicorn.Server(config).run(sockets=[started.sock])
    finally:
        started.close()
    return 0
