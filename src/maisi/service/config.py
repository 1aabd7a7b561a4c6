"""`ServeOptions`: everything `maisi serve` is started with, checked once in the constructor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

NIM_LIMITS = ("auto", "on", "off")


@dataclass(frozen=True)
class ServeOptions:
    """How the service runs. Every field is JSON-serialisable; impossible values raise ValueError here."""

    weights: tuple[str, ...] | None = None  # a maisi model folder or NVIDIA's .pt files; None: the demo model
    config: str | None = None  # preset or JSON config for released .pt files
    host: str = "127.0.0.1"  # localhost unless told otherwise
    port: int = 8000
    token: str | None = None  # bearer token checked on every route except /v1/health/*
    work_dir: Path = Path("maisi-serve")  # jobs.sqlite and one folder per job
    devices: tuple[str, ...] = ()  # one worker per device; (): every CUDA device, else one CPU worker
    precision: str = "fp32"  # the networks' precision when a request does not name one
    queue_size: int = 16  # jobs queued or running at once; more get 503
    max_samples: int = 10  # num_output_samples per request
    max_upload_mb: float = 256.0  # request bodies (payloads and mask uploads)
    rate_limit: float = 600.0  # requests per minute per client address, health routes excepted; 0: no limit
    max_restarts: int = 2  # a job interrupted by more server restarts than this is marked failed
    nim_limits: str = "auto"  # the NIM's output_size/spacing limits: on, off, auto (on for NVIDIA's CT networks)
    local_dirs: tuple[str, ...] = ()  # roots a request's local_working_dir may lie under; (): the field is refused

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty; leave it out to serve without one")
        for name in ("queue_size", "max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not (math.isfinite(self.max_upload_mb) and self.max_upload_mb > 0):
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        if not (math.isfinite(self.rate_limit) and self.rate_limit >= 0):
            raise ValueError(f"rate_limit must be >= 0 requests per minute (0: no limit), got {self.rate_limit}")
        if self.nim_limits not in NIM_LIMITS:
            raise ValueError(f"nim_limits must be one of {list(NIM_LIMITS)}, got {self.nim_limits!r}")
        object.__setattr__(self, "work_dir", Path(self.work_dir))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(str(w) for w in self.weights))
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "local_dirs", tuple(str(d) for d in self.local_dirs))
        for d in self.local_dirs:
            if not Path(d).is_absolute() or not Path(d).is_dir():
                raise ValueError(f"local_dirs: {d!r} must be an absolute path to an existing folder")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def database(self) -> Path:
        return self.work_dir / "jobs.sqlite"

    def job_dir(self, job_id: str) -> Path:
        return self.work_dir / "jobs" / job_id
