"""One home for turning a device name into a torch.device: the default, the allowed names, and the check that
the hardware is there, before any work starts."""

from __future__ import annotations

import torch


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """`name`: "cpu", "cuda", "cuda:N", or None (cuda when a GPU is visible, else cpu). Raises ValueError for any
    other name, for CUDA without a visible GPU, and for a GPU index the machine does not have."""
    if name is None:
        return torch.device("cuda" if torch.cuda.device_count() > 0 else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(name)!r} is not one of cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(name)!r} is not one of cpu, cuda, cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {str(name)!r} asked for but CUDA is not available (no GPU visible); use 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(name)!r} asked for but this machine has {count} GPU(s): "
                             f"cuda:0..cuda:{count - 1}")
    return dev
