"""`maisi serve`'s checks before it serves: bad weights, devices, precision, a taken port or work dir, and a work dir
that is a file are refused in one line with exit 2, leaving nothing behind; a good start serves."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import uvicorn

from maisi.cli import main
from maisi.service.app import lock_work_dir
from maisi.service.config import ServeOptions
from maisi.service.startup import check_devices, check_model, listen, start
from pipeline_support import save_tiny_model
from service_support import ProcessServer, free_port


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))[0]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def listening():
    """A port another server listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# ---- the checks, one by one ---------------------------------------------------------------------

@pytest.mark.parametrize("devices, gpus, message", [
    (["gpu"], 0, "device 'gpu' is not one of cpu, cuda, cuda:N"),
    (["cuda:0"], 0, "device 'cuda:0' asked for but CUDA is not available"),
    (["cpu", "cuda"], 0, "device 'cuda' asked for but CUDA is not available"),
    (["cuda:2"], 2, "this machine has 2 GPU(s): cuda:0..cuda:1"),
    (["meta"], 0, "device 'meta' is not one of cpu, cuda, cuda:N"),
])
def test_bad_devices_are_refused(monkeypatch, devices, gpus, message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_devices(devices, "fp32")


def test_devices_are_checked_for_the_precision():
    check_devices(["cpu"], "bf16")
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        check_devices(["cpu"], "fp16")


def test_weights_are_resolved(model, tmp_path):
    check_model([str(model)], None)
    with pytest.raises(FileNotFoundError, match="weights not found: no checkpoint at"):
        check_model([str(tmp_path / "nonexist")], None)
    with pytest.raises(ValueError, match="unknown preset"):
        check_model([str(model)], "no-such-preset")


def test_weights_without_a_unet_are_refused(model, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "autoencoder").symlink_to(model / "autoencoder")
    with pytest.raises(ValueError, match="no diffusion UNet weights there"):
        check_model([str(tmp_path / "m")], None)


def test_a_taken_port_is_refused(listening):
    with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{listening}: in use"):
        listen("127.0.0.1", listening)
    listen("127.0.0.1", free_port()).close()


def test_work_dir_checks(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="work_dir .*afile is a file, not a folder"):
        lock_work_dir(tmp_path / "afile")
    with pytest.raises(ValueError, match="cannot create it or its server.lock"):
        lock_work_dir(tmp_path / "afile" / "sub")
    with lock_work_dir(tmp_path / "new" / "work"), pytest.raises(ValueError, match="in use by another maisi serve"):
        lock_work_dir(tmp_path / "new" / "work")


def test_start_takes_the_port_and_the_lock(model, tmp_path):
    options = ServeOptions(weights=(str(model),), work_dir=tmp_path / "w", port=free_port(), devices=("cpu",))
    started = start(options)
    try:
        with pytest.raises(ValueError, match="in use"):
            listen("127.0.0.1", options.port)
        with pytest.raises(ValueError, match="in use by another maisi serve"):
            lock_work_dir(options.work_dir)
    finally:
        started.close()
    start(options).close()  # both free again


# ---- `maisi serve`: one line, exit 2, nothing left behind ----------------------------------------

def serve(model: Path, work_dir: Path, port: int, *extra: str) -> list[str]:
    return ["serve", "--weights", str(model), "--work-dir", str(work_dir), "--port", str(port), *extra]


@pytest.mark.parametrize("case, message", [
    ("file", "--work-dir {work} is a file, not a folder"),
    ("locked", "--work-dir {work} is in use by another maisi serve"),
    ("port", "cannot listen on 127.0.0.1:{port}: in use (another server?); choose another --port"),
    ("weights", "weights not found: no checkpoint at {work}.pt"),
    ("cuda", "device 'cuda:0' asked for but CUDA is not available (no GPU visible); use 'cpu'"),
])
def test_serve_refuses_a_bad_start_in_one_line(model, tmp_path, capsys, monkeypatch, no_cuda, listening, case,
                                               message):
    def serving(*args, **kw):
        raise AssertionError("the server started")  # rather than serve forever

    monkeypatch.setattr(uvicorn.Server, "run", serving)
    work = tmp_path / "work"
    port, extra, lock = free_port(), [], None
    if case == "file":
        work.write_text("")
    elif case == "locked":
        lock = lock_work_dir(work)
    elif case == "port":
        port = listening
    elif case == "weights":
        model = Path(f"{work}.pt")
    elif case == "cuda":
        extra = ["--device", "cuda:0"]
    before = sorted(tmp_path.rglob("*"))
    try:
        assert main(serve(model, work, port, *extra)) == 2
    finally:
        if lock is not None:
            lock.close()
    err = capsys.readouterr().err
    assert err.startswith(f"maisi serve: error: {message.format(work=work, port=port)}") and err.count("\n") == 1, err
    assert sorted(tmp_path.rglob("*")) == before  # no jobs.sqlite, no server.lock, no folder


def test_serve_starts_and_a_second_server_on_its_work_dir_is_refused(model, tmp_path):
    with ProcessServer(model, tmp_path) as server:
        assert server.client.get("/v1/health/ready").json() == {"status": "ready"}
        second = subprocess.run([sys.executable, "-m", "maisi", *serve(model, tmp_path, free_port())],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert "is in use by another maisi serve" in second.stderr
        assert server.client.get("/v1/health/ready").status == 200  # the first one serves on
