"""Support for the service tests (no tests here): the real `maisi serve` on 127.0.0.1, as uvicorn in a thread or
`python -m maisi serve` in a process, and a small urllib client."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import uvicorn

from maisi.service.app import create_app
from maisi.service.config import ServeOptions

# A NIM-shaped payload that the tiny random model runs in well under a second per sample.
SMALL = {"num_output_samples": 1, "body_region": ["chest"], "output_size": [32, 32, 32], "spacing": [8.0, 8.0, 8.0],
         "steps": 1, "quality_check": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def detail(self) -> str:
        return str(self.json().get("detail"))


class Client:
    def __init__(self, base: str, token: str | None = None) -> None:
        self.base, self.token = base, token
        self.work_dir: Path | None = None  # the server's, when the test started it

    def call(self, method: str, path: str, payload: Any = None, data: bytes | None = None,
             headers: dict[str, str] | None = None, token: str | None = None, timeout: float = 60) -> Reply:
        headers = dict(headers or {})
        if payload is not None:
            data = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        token = token if token is not None else self.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Reply(r.status, dict(r.headers), r.read())
        except urllib.error.HTTPError as e:
            return Reply(e.code, dict(e.headers), e.read())

    def get(self, path: str, **kw) -> Reply:
        return self.call("GET", path, **kw)

    def post(self, path: str, payload: Any = None, **kw) -> Reply:
        return self.call("POST", path, payload, **kw)

    def upload(self, path: str, payload: dict, files: dict[str, tuple[str, bytes]]) -> Reply:
        """multipart/form-data: the JSON payload in a 'payload' field, and the files."""
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="payload"\r\n\r\n{json.dumps(payload)}\r\n'
                 .encode()]
        for field, (name, content) in files.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        return self.call("POST", path, data=b"".join(parts),
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def wait_job(self, job_id: str, until: Callable[[dict], bool] | None = None, timeout: float = 120) -> dict:
        """Poll a job until `until(job)` (default: a final state)."""
        until = until or (lambda j: j["state"] in ("done", "failed", "cancelled"))
        end = time.monotonic() + timeout
        while True:
            job = self.get(f"/v1/jobs/{job_id}").json()
            if until(job):
                return job
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {job}")
            time.sleep(0.05)


def zip_names(body: bytes) -> list[str]:
    return sorted(zipfile.ZipFile(io.BytesIO(body)).namelist())


def options(model: Path, work_dir: Path, **change) -> ServeOptions:
    base = ServeOptions(weights=(str(model),), work_dir=work_dir, port=free_port(), devices=("cpu",),
                        rate_limit=0, nim_limits="off")
    return replace(base, **change)


class ThreadServer:
    """uvicorn serving `create_app(options)` in a thread; entering waits until /v1/health/ready is 200."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        config = uvicorn.Config(create_app(options), host="127.0.0.1", port=options.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.client = Client(f"http://127.0.0.1:{options.port}", options.token)
        self.client.work_dir = options.work_dir
        self.exit_code: int | str | None = None

    def _run(self) -> None:
        try:
            self.server.run()
        except SystemExit as e:  # uvicorn exits when the app's start-up fails
            self.exit_code = e.code

    def __enter__(self) -> Client:
        self.thread.start()
        wait_ready(self.client, lambda: self.thread.is_alive())
        return self.client

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


class ProcessServer:
    """`python -m maisi serve ...` in a subprocess (so that a test can kill it)."""

    def __init__(self, model: Path, work_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "maisi", "serve", "--weights", str(model), "--work-dir", str(work_dir),
                     "--port", str(self.port), "--device", "cpu", "--nim-limits", "off", "--rate-limit", "0", *extra]
        self.client = Client(f"http://127.0.0.1:{self.port}")
        self.log = Path(work_dir) / "server.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ProcessServer:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:  # the server's own output, for a failing test to show
            self.proc = subprocess.Popen(self.args, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self.client, lambda: self.proc.poll() is None, timeout=120)
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def wait_ready(client: Client, alive: Callable[[], bool], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive():
            raise RuntimeError("the server stopped while starting")
        try:
            if client.get("/v1/health/ready", timeout=5).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the server did not become ready")
