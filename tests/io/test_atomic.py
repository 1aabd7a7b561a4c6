"""Atomic writes, tested by killing each writer's serializer midway: the file that was there stays intact and
no temporary file is left. A writer that wrote straight into its target would leave half a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
from PIL import Image

import maisi.data.prepare
import maisi.io.checkpoint
from maisi.config import preset
from maisi.data.prepare import save_latents
from maisi.data.preview import save_preview
from maisi.evaluation.report import write_report
from maisi.io.atomic import STALE_AFTER, atomic_write_text
from maisi.io.checkpoint import WEIGHTS_FILE, save_pretrained
from maisi.io.volume import read_volume, write_volume
from maisi.pipeline.record import write_record
from maisi.training.state import save_checkpoint


def _volume(folder: Path, v: int) -> Path:
    return write_volume(folder / "image.nii.gz", np.full((4, 4, 4), v, np.int16), np.eye(4))


def _record(folder: Path, v: int) -> Path:
    return write_record(folder / "sample_seed0_record.json", {"seed": v})


def _checkpoint(folder: Path, v: int) -> Path:
    return save_checkpoint(folder, 5, {"step": 5, "modules": {"m": {"w": torch.full((4,), float(v))}}})


def _export(folder: Path, v: int) -> Path:
    net = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(net.weight, v)
    return save_pretrained(folder / "unet", net, preset("tiny"), "unet") / WEIGHTS_FILE


def _latents(folder: Path, v: int) -> Path:
    return save_latents(folder / "case_latent.safetensors", torch.full((4, 2, 2, 2), float(v)), torch.ones(4, 2, 2, 2))


def _preview(folder: Path, v: int) -> Path:
    return save_preview(folder / "case_preview.png", np.full((8, 8, 8), 100.0 * v - 500, np.float32))


def _report(folder: Path, v: int) -> Path:
    write_report(folder, "fid", {"v": v}, f"# FID {v}", plots={"hist": Image.new("L", (4, 4), 50 * v)})
    return folder / "fid_hist.png"


# writer kind → (write version v of its file and return the target, [(object, serializer)], path argument)
WRITERS = {
    "volume-nifti": (_volume, [(nibabel, "save")], 1),
    "record-json": (_record, [(Path, "write_text")], 0),
    "training-checkpoint": (_checkpoint, [(torch, "save")], 1),
    "model-export-safetensors": (_export, [(maisi.io.checkpoint, "save_file")], 1),
    "latents-safetensors": (_latents, [(maisi.data.prepare, "save_file")], 1),  # where save_latents looks it up
    "preview-png": (_preview, [(Image.Image, "save")], 1),
    "report-png": (_report, [(Image.Image, "save")], 1),
}


def dies_midway(path_arg: int):
    """A serializer that writes the first bytes of its file, then the process is interrupted."""

    def serializer(*args, **kwargs):
        with open(args[path_arg], "wb") as f:
            f.write(b"PK\x03\x04\x1f\x8b half a file")
        raise KeyboardInterrupt

    return serializer


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_write_killed_midway_leaves_the_previous_file(kind, tmp_path, monkeypatch):
    write, serializers, path_arg = WRITERS[kind]
    target = write(tmp_path, 1)
    before = files_in(tmp_path)
    assert str(target.relative_to(tmp_path)) in before
    with monkeypatch.context() as m:
        for obj, name in serializers:
            m.setattr(obj, name, dies_midway(path_arg))
        with pytest.raises(KeyboardInterrupt):
            write(tmp_path, 2)
    assert files_in(tmp_path) == before  # the target intact, nothing half-written, no temporary file left
    write(tmp_path, 2)
    assert target.read_bytes() != before[str(target.relative_to(tmp_path))]  # version 2 differs: the test can see


def test_a_volume_write_killed_by_sigkill_leaves_the_previous_volume(tmp_path):
    """A real `kill -9` midway (no cleanup can run): the target is the old volume; at most a hidden temporary
    file (.image.nii.gz.*.tmp.nii.gz) is left beside it, which a later write of the target removes."""
    target = _volume(tmp_path, 1)
    script = textwrap.dedent("""
        import os, signal, sys
        import nibabel, numpy as np
        from maisi.io.volume import write_volume

        def dies(img, filename, **kwargs):
            with open(filename, "wb") as f:
                f.write(b"\\x1f\\x8b half a volume")
            os.kill(os.getpid(), signal.SIGKILL)

        nibabel.save = dies
        write_volume(sys.argv[1], np.full((4, 4, 4), 2, np.int16), np.eye(4))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(target)], env=env, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    np.testing.assert_array_equal(read_volume(target).array, np.full((4, 4, 4), 1))
    left = [p for p in tmp_path.iterdir() if p != target]
    assert left and all(p.name.startswith(".image.nii.gz.") and ".tmp" in p.name for p in left), left
    _volume(tmp_path, 3)  # the next write, while the leftover is fresh: kept (it could be a live writer's)
    assert all(p.exists() for p in left)
    for p in left:  # an hour later, its writer is dead: the next write of the same target removes it
        os.utime(p, (p.stat().st_atime, p.stat().st_mtime - STALE_AFTER - 60))
    _volume(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.nii.gz"]


def _temp(folder: Path, name: str, age: float) -> Path:
    p = folder / name
    p.write_bytes(b"half a file")
    os.utime(p, (p.stat().st_atime, p.stat().st_mtime - age))
    return p


DEAD = 2**22 + 7  # above Linux's largest pid_max: no such process


@pytest.mark.parametrize("name, age, removed", [
    (f".a.json.{DEAD}-abcd_123.tmp", 2 * STALE_AFTER, True),  # a killed writer's, an hour old: removed
    (".a.json.abcd_123.tmp", 2 * STALE_AFTER, True),  # the same, named before the PID was in the name
    (f".a.json.{DEAD}-abcd_123.tmp", 60, False),  # a minute old: its writer may still be writing (another machine)
    (f".a.json.{os.getpid()}-abcd_123.tmp", 2 * STALE_AFTER, False),  # a live process's
    (f".b.json.{DEAD}-abcd_123.tmp", 2 * STALE_AFTER, False),  # another target's
    (f".a.json.{DEAD}-abcd_123.tmp.gz", 2 * STALE_AFTER, False),  # another suffix: not this writer's
    (".a.json.tmp", 2 * STALE_AFTER, False),  # not a name the writer makes
    (f".a.json.x.{DEAD}-abcd_123.tmp", 2 * STALE_AFTER, False),  # the target a.json.x's
], ids=["stale", "stale-old-name", "fresh", "live-pid", "other-target", "other-suffix", "not-a-temp", "longer-name"])
def test_the_next_write_removes_stale_temporary_files_of_its_target(tmp_path, name, age, removed):
    """A temporary file left by a `kill -9` goes with the next write of its target, once an hour old and not a
    live process's; nothing else beside the target is touched."""
    temp = _temp(tmp_path, name, age)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert temp.exists() != removed
    assert (tmp_path / "a.json").read_text() == "{}"
