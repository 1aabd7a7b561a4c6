"""Where a job's outputs go besides its result zip: the NIM's `local_working_dir` (a folder on the server's
machine, under a root the operator allows with `--allow-local-dir`) and `pre_signed_url` (an HTTP PUT of the zip,
as the NIM does for S3 pre-signed URLs)."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maisi.io.atomic import OutputLocationError, atomic_path, atomic_write_text, check_output_dir
from maisi.service.nim import NotSupportedError

DELIVERY = "delivery.json"  # in the job folder: where this job's outputs go once generated (survives restarts)
UPLOAD_SCHEMES = ("http", "https")
UPLOAD_TIMEOUT_S = 300.0


class ForbiddenError(ValueError):
    """A local_working_dir outside every root the operator allows (answered 403)."""


class DeliveryError(RuntimeError):
    """The outputs were generated but could not be written to local_working_dir or uploaded to pre_signed_url."""


def safe_url(url: str) -> str:
    """The URL without its query and fragment: a pre-signed URL's query is its credential, never shown."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # no user:password either
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")) if parts.scheme else "?"


def check_url(url: str) -> str:
    """A pre_signed_url the server can PUT to: http or https with a host; ValueError naming the field otherwise."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme.lower() not in UPLOAD_SCHEMES or not parts.hostname:
        raise ValueError(f"pre_signed_url must be an http:// or https:// URL with a host (the result zip is "
                         f"uploaded to it with PUT), got scheme {parts.scheme or 'none'!r}")
    return url.strip()


def check_local_dir(value: str, roots: Sequence[str]) -> Path:
    """The resolved local_working_dir (symlinks followed), refused unless it lies under an allowed root and can be
    written: 422 when the server allows none, 403 outside them, 400 for a relative or unwritable path."""
    if not roots:
        raise NotSupportedError("local_working_dir is not enabled on this server: its operator must allow a root "
                                "with `maisi serve --allow-local-dir PATH` (the folder must lie under it); leave "
                                "local_working_dir out to get the zip in the response or from "
                                "GET /v1/jobs/{id}/result")
    path = Path(value)
    if not path.is_absolute():
        raise ValueError(f"local_working_dir must be an absolute path on the server's machine, got {value!r}")
    resolved = path.resolve()
    allowed = [Path(r).resolve() for r in roots]
    if not any(resolved == r or r in resolved.parents for r in allowed):
        raise ForbiddenError(f"local_working_dir {value!r} is outside the folders this server allows "
                             f"({', '.join(map(str, allowed))}; symlinks are followed); choose a folder under one "
                             "of them")
    try:
        check_output_dir(resolved, "local_working_dir")
    except OutputLocationError as e:
        raise ValueError(str(e)) from None
    return resolved


def check_delivery(pre_signed_url: str | None, local_working_dir: str | None,
                   roots: Sequence[str]) -> dict[str, Any]:
    """The checked delivery of a submission ({} when it asks for none); empty strings count as unset (the NIM's
    examples send them)."""
    delivery: dict[str, Any] = {}
    if local_working_dir:
        check_local_dir(local_working_dir, roots)
        delivery["local_working_dir"] = local_working_dir
    if pre_signed_url:
        delivery["pre_signed_url"] = check_url(pre_signed_url)
    return delivery


def save_delivery(job_dir: Path, delivery: dict[str, Any]) -> None:
    if delivery:
        atomic_write_text(job_dir / DELIVERY, json.dumps(delivery))


def load_delivery(job_dir: Path) -> dict[str, Any]:
    path = job_dir / DELIVERY
    return json.loads(path.read_text()) if path.is_file() else {}


def copy_outputs(out: Path, target: Path) -> list[Path]:
    """Every file of the result zip (those under `out`, a DICOM series folder included) into `target`, each one
    written atomically (a reader never sees a partial file)."""
    written = []
    for f in sorted(out.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            dest = target / f.relative_to(out)
            with atomic_path(dest, "".join(f.suffixes)) as tmp:
                shutil.copyfile(f, tmp)
            written.append(dest)
    return written


def upload(zip_path: Path, url: str, timeout: float = UPLOAD_TIMEOUT_S) -> None:
    """PUT the zip to `url`; DeliveryError with the reason (the URL shown without its query) on any failure."""
    size = zip_path.stat().st_size
    try:
        with open(zip_path, "rb") as f:
            req = urllib.request.Request(url, data=f, method="PUT", headers={
                "Content-Type": "application/zip", "Content-Length": str(size)})
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                reply.read()
    except urllib.error.HTTPError as e:
        raise DeliveryError(f"pre_signed_url: the upload to {safe_url(url)} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DeliveryError(f"pre_signed_url: the upload to {safe_url(url)} failed: {reason}") from None


def deliver(job_dir: Path, out: Path, zip_path: Path, roots: Sequence[str]) -> list[str]:
    """Carry out the job's delivery (if any): the files into local_working_dir (its root checked again: a symlink
    may have changed since the submission), then the zip to pre_signed_url. What was done, for the job's message."""
    delivery = load_delivery(job_dir)
    done = []
    if delivery.get("local_working_dir"):
        try:
            target = check_local_dir(delivery["local_working_dir"], roots)
            copy_outputs(out, target)
        except (ValueError, OSError) as e:
            raise DeliveryError(f"local_working_dir: {e}") from None
        done.append(f"written to {target}")
    if delivery.get("pre_signed_url"):
        upload(zip_path, delivery["pre_signed_url"])
        done.append(f"uploaded to {safe_url(delivery['pre_signed_url'])}")
    return done
