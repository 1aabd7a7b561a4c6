"""Atomic writes: write to a temporary file beside the target, then rename over it; output folders checked first."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class OutputLocationError(ValueError):
    """An output folder that cannot be created or written."""


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Refuse, without creating anything, an output folder that is a file, lies under a file or cannot be
    created or written; called before any work so that a bad --out fails before the compute."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputLocationError(f"{path}: the {what} is an existing file; give a folder (new or existing)")
    existing = path
    while not existing.exists():  # the deepest part of the path that exists
        existing = existing.parent
    if not existing.is_dir():
        raise OutputLocationError(f"{path}: cannot create the {what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputLocationError(f"{path}: cannot {'write into' if existing == path else 'create'} the {what}: "
                                  f"{existing} is not writable")
    return path


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Refuse, without creating anything, an output file that is an existing folder, lies under a file or whose
    folder cannot be created or written; an existing file is allowed (it is replaced atomically at the end)."""
    path = Path(path)
    if path.is_dir():
        raise OutputLocationError(f"{path}: the {what} is an existing folder; give a file path")
    try:
        check_output_dir(path.parent, "folder")
    except OutputLocationError as e:
        raise OutputLocationError(f"{path}: cannot write the {what}: {e}") from None
    return path


def _umask() -> int:
    """The process umask, read without changing it on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, then restore at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode any tool gives a new file: 0666 minus the process umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode any tool gives a new folder: 0777 minus the process umask."""
    return 0o777 & ~_umask()


# A temporary file is named .NAME.PID-XXXXXXXX.tmpSUFFIX (older versions: .NAME.XXXXXXXX.tmpSUFFIX; XXXXXXXX is
# mkstemp's). One left by a killed writer (`kill -9`, power loss) is removed by the next successful write of NAME
# once it is STALE_AFTER seconds old and its PID is not a live process here. The age is what makes it safe: on a
# shared file system the PID may belong to another machine, and a live writer touches its file as it writes.
STALE_AFTER = 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's live process (or a number os.kill cannot take: keep the file)
    return True


def remove_stale_temps(path: str | Path, suffix: str = "", older_than: float = STALE_AFTER) -> list[Path]:
    """Remove the temporary files (or folders, see `atomic_dir`) of target `path` (written with `suffix`) that
    killed writers left behind: older than `older_than` seconds (by mtime) and not owned by a live process of
    this machine. Returns them."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-)?[a-z0-9_]{{8}}\.tmp{re.escape(suffix)}")
    cutoff, removed = time.time() - older_than, []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for e in entries:
            m = pattern.fullmatch(e.name)
            is_dir = e.is_dir(follow_symlinks=False)
            if not m or not (is_dir or e.is_file(follow_symlinks=False)) or (m[1] and _pid_alive(int(m[1]))):
                continue
            with contextlib.suppress(OSError):  # gone already, or not ours to remove: leave it
                if e.stat(follow_symlinks=False).st_mtime < cutoff:
                    shutil.rmtree(e.path) if is_dir else os.unlink(e.path)
                    removed.append(Path(e.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path` atomically.

    On any exception the temporary file is removed and the target is left as it was; after a success, stale
    temporary files of the same target left by killed writers are removed (`remove_stale_temps`).
    `suffix` keeps the extension a writer may need (e.g. ".nii.gz"). The file gets the umask's mode
    (e.g. 0644 under umask 022), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # the writer may have replaced the file: set its mode now
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    remove_stale_temps(path, suffix)


@contextlib.contextmanager
def atomic_dir(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a new temporary folder beside `path`; on success it takes the place of `path` (a folder of files,
    such as a DICOM series), whatever was there before being removed only once the new folder is complete.

    On any exception the temporary folder is removed and `path` is left as it was. The folder gets the umask's
    mode and its files are flushed to disk before the rename. Replacing an existing `path` takes two renames
    (old aside, new in), so a reader may briefly find no `path`; it never finds a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".tmp{suffix}", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, dir_mode())
        old = None
        if path.is_dir() and not path.is_symlink():  # move the old folder aside under a temporary name
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".tmp{suffix}", dir=path.parent))
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temps(path, suffix)


def atomic_write(path: str | Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call `write(tmp_path)` and move the result to `path` atomically."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))
