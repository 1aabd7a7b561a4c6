"""What `maisi serve` checks before it serves, in an order that leaves nothing behind: the weights, devices and
precision (nothing written), then the port (listening), then the work dir (its lock taken)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from maisi.device import pick_device
from maisi.networks.precision import compute_dtype
from maisi.networks.weights import resolve
from maisi.service.app import lock_work_dir
from maisi.service.config import ServeOptions
from maisi.service.workers import default_devices


@dataclass
class Startup:
    """The listening socket and the work dir's lock, held from the checks until the server takes them over."""

    sock: socket.socket
    lock: IO

    def close(self) -> None:
        self.sock.close()
        self.lock.close()


def start(options: ServeOptions) -> Startup:
    """Every check of a start, then the port and the work dir's lock, taken for the server. Raises ValueError (or
    FileNotFoundError for weights) naming the option; whatever fails leaves no file or folder behind."""
    check_model(options.weights, options.config)
    check_devices(options.devices or default_devices(), options.precision)
    sock = listen(options.host, options.port)
    try:
        return Startup(sock, lock_work_dir(options.work_dir))
    except BaseException:
        sock.close()
        raise


def check_model(weights: Sequence[str] | None, config: str | None) -> None:
    """The weights spec resolves to files holding an autoencoder and a diffusion UNet, and their config is
    consistent; paths and configs only (the workers load the networks)."""
    sources = resolve(weights)
    sources.only("autoencoder", "unet")  # the networks generation needs; an error naming the spec if one is absent
    sources.config(config)


def check_devices(devices: Sequence[str], precision: str) -> None:
    """Each worker's device exists on this machine (cpu, cuda, cuda:N) and runs `precision`."""
    for name in devices:
        compute_dtype(precision, pick_device(name))


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port), as uvicorn makes one (SO_REUSEADDR; IPv6 when the host has a ':'), so
    that no other server takes the port before this one serves (connections wait in the backlog till then)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()
    except OSError as e:
        sock.close()
        why = "in use (another server?); choose another port" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise ValueError(f"cannot listen on {host}:{port}: {why}") from None
    return sock
