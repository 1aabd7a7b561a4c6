"""NVIDIA's released MAISI files on the Hugging Face hub: the catalogue, download, offline lookup, sha256 checks.

Downloads go through `huggingface_hub.hf_hub_download`, so the hub cache, `HF_HOME`, `HF_ENDPOINT`,
`HF_HUB_OFFLINE` and `HF_TOKEN` work as everywhere else. Every file's sha256 is recorded at first sight in
a manifest under maisi's cache folder and checked on every later call; a file that no longer matches is
never returned.

Revisions: the default is each repository's `main` branch (commit hashes could not be read when this
catalogue was written). The commit that `main` resolved to is recorded in the manifest and visible in the
returned paths (`.../snapshots/<commit>/...`); pin it with `revision={"nvidia/NV-Generate-CT": "<commit>"}`
(`maisi download --revision nvidia/NV-Generate-CT=<commit>`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

from maisi.io.atomic import atomic_write_text
from maisi.io.digest import sha256_file

Component = Literal["autoencoder", "unet", "controlnet", "mask_autoencoder", "mask_unet", "dataset"]

CT = "nvidia/NV-Generate-CT"
MR = "nvidia/NV-Generate-MR"
MR_BRAIN = "nvidia/NV-Generate-MR-Brain"
# Default revision per repository. "main" until someone with hub access pins commits here.
DEFAULT_REVISIONS: dict[str, str] = {CT: "main", MR: "main", MR_BRAIN: "main"}

MANIFEST_FORMAT = "maisi-hub-manifest"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The HTTP library's base error (httpx in huggingface_hub 1.x, httpx2 in 2.x): a transfer that failed
# after huggingface_hub's own retries.
_TRANSPORT_ERRORS = tuple(b for b in HfHubHTTPError.__bases__ if b is not OSError)


class HubError(ValueError):
    """The hub refused a request: unknown revision, missing file, gated or private repository."""


class ChecksumMismatchError(HubError):
    """A cached file whose sha256 is not the one recorded for it."""


class MissingFilesError(FileNotFoundError):
    """Released files that are not in the local cache and cannot be downloaded now (offline)."""


@dataclass(frozen=True)
class ReleasedFile:
    """One file NVIDIA published: where it lives on the hub and what it holds."""

    repo: str
    path: str  # path inside the repository
    component: Component
    approx_mb: float | None  # approximate download size; None where not known


@dataclass(frozen=True)
class ReleasedSet:
    """A named group of files that one use of the models needs."""

    name: str
    description: str
    files: tuple[ReleasedFile, ...]

    def __post_init__(self) -> None:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError(f"set {self.name!r} names a file path twice: {paths}")

    @property
    def repos(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.repo for f in self.files))

    @property
    def approx_mb(self) -> float:
        return sum(f.approx_mb or 0.0 for f in self.files)


def _f(repo: str, path: str, component: Component, approx_mb: float | None) -> ReleasedFile:
    return ReleasedFile(repo, path, component, approx_mb)


# Sizes: autoencoder_v1, the rflow-ct pair and the mask models as published (REFERENCE §7); autoencoder_v2
# and the ddpm ControlNet estimated from their parameter counts (fp32 weights only); None: not known.
FILES: dict[str, ReleasedFile] = {f.path: f for f in (
    _f(CT, "models/autoencoder_v1.pt", "autoencoder", 80),
    _f(CT, "models/diff_unet_3d_rflow-ct.pt", "unet", 2100),
    _f(CT, "models/controlnet_3d_rflow-ct.pt", "controlnet", 275),
    _f(CT, "models/diff_unet_3d_ddpm-ct.pt", "unet", None),
    _f(CT, "models/controlnet_3d_ddpm-ct.pt", "controlnet", 262),
    _f(CT, "models/mask_generation_autoencoder.pt", "mask_autoencoder", 21),
    _f(CT, "models/mask_generation_diffusion_unet.pt", "mask_unet", 753),
    _f(CT, "datasets/all_anatomy_size_conditions.json", "dataset", None),
    _f(CT, "datasets/all_masks_flexible_size_and_spacing_4000.zip", "dataset", None),
    _f(CT, "datasets/candidate_masks_flexible_size_and_spacing_4000.json", "dataset", None),
    _f(CT, "datasets/candidate_masks_flexible_size_and_spacing_3000.json", "dataset", None),
    _f(MR, "models/autoencoder_v2.pt", "autoencoder", 80),
    _f(MR, "models/diff_unet_3d_rflow-mr.pt", "unet", None),
    _f(MR_BRAIN, "models/diff_unet_3d_rflow-mr-brain_v1.pt", "unet", None),
)}


def _set(name: str, description: str, *paths: str) -> ReleasedSet:
    return ReleasedSet(name, description, tuple(FILES[p] for p in paths))


_MASK_DB = ("datasets/all_masks_flexible_size_and_spacing_4000.zip", "datasets/all_anatomy_size_conditions.json")
# Set contents follow NVIDIA-Medtech/NV-Generate-CTMR scripts/download_model_data.py, except that rflow-ct
# leaves out the mask-generation models (maisi's rflow-ct pipeline draws masks from the database); `mask-ct` holds
# them with their conditions file, so that `--weights rflow-ct mask-ct` adds size control to the v2 model.
# ddpm-ct pairs the 4000-mask zip with the 3000-entry candidate list, as upstream does. rflow-mr-brain uses
# autoencoder_v1 from NV-Generate-CT (upstream environment_maisi_diff_model_rflow-mr-brain.json:
# "trained_autoencoder_path": "models/autoencoder_v1.pt"); rflow-mr uses autoencoder_v2.
SETS: dict[str, ReleasedSet] = {s.name: s for s in (
    _set("rflow-ct", "MAISI v2 CT: rectified-flow UNet + ControlNet, VAE, mask database",
         "models/autoencoder_v1.pt", "models/diff_unet_3d_rflow-ct.pt", "models/controlnet_3d_rflow-ct.pt",
         *_MASK_DB, "datasets/candidate_masks_flexible_size_and_spacing_4000.json"),
    _set("ddpm-ct", "MAISI v1 CT: DDPM UNet + ControlNet, VAE, mask-generation models, mask database",
         "models/autoencoder_v1.pt", "models/diff_unet_3d_ddpm-ct.pt", "models/controlnet_3d_ddpm-ct.pt",
         "models/mask_generation_autoencoder.pt", "models/mask_generation_diffusion_unet.pt",
         *_MASK_DB, "datasets/candidate_masks_flexible_size_and_spacing_3000.json"),
    _set("mask-ct", "MAISI v1 mask generation: mask autoencoder + mask UNet (--anatomy-size), size conditions",
         "models/mask_generation_autoencoder.pt", "models/mask_generation_diffusion_unet.pt",
         "datasets/all_anatomy_size_conditions.json"),
    _set("rflow-mr", "MAISI v2 MR: rectified-flow UNet, MR VAE (autoencoder_v2)",
         "models/autoencoder_v2.pt", "models/diff_unet_3d_rflow-mr.pt"),
    _set("rflow-mr-brain", "MAISI v2 brain MR: rectified-flow UNet, CT VAE (autoencoder_v1)",
         "models/autoencoder_v1.pt", "models/diff_unet_3d_rflow-mr-brain_v1.pt"),
    ReleasedSet("all", "every released file", tuple(FILES.values())),
)}


def released_set(name: str) -> ReleasedSet:
    if name not in SETS:
        raise ValueError(f"unknown set {name!r}; choose one of {list(SETS)}")
    return SETS[name]


def maisi_cache_dir() -> Path:
    """maisi's cache folder: $MAISI_CACHE, else $XDG_CACHE_HOME/maisi, else ~/.cache/maisi."""
    base = os.environ.get("MAISI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "maisi")
    return Path(base)


def manifest_path() -> Path:
    return maisi_cache_dir() / "hub" / "manifest.json"


def snapshot_commit(local: str | Path, file: ReleasedFile) -> str:
    """The commit a cached file belongs to, from the hub cache's layout `.../snapshots/<commit>/<path>`."""
    return Path(local).parents[len(PurePosixPath(file.path).parts) - 1].name


def copy_over_help(name: str) -> str:
    """How to get a set onto a machine that cannot reach the hub."""
    repos = released_set(name).repos
    folders = ", ".join(f"hub/models--{r.replace('/', '--')}" for r in repos)
    return (f"download them with `maisi download {name}`; without internet here, run that (or "
            f"`hf download {repos[0]} FILE...`) on a machine with internet and copy the hub cache folders "
            f"{folders} from its $HF_HOME (default ~/.cache/huggingface) into $HF_HOME/hub/ here, or pass "
            "the downloaded .pt files to `maisi generate --weights`")


def _revisions(rs: ReleasedSet, revision: str | Mapping[str, str] | None) -> dict[str, str]:
    """repo -> revision for every repository of the set."""
    if revision is None:
        return {r: DEFAULT_REVISIONS[r] for r in rs.repos}
    if isinstance(revision, str):
        if _COMMIT.fullmatch(revision) and len(rs.repos) > 1:
            raise ValueError(f"a commit hash belongs to one repository, but set {rs.name!r} spans "
                             f"{list(rs.repos)}; pass one REPO=COMMIT per repository")
        return {r: revision for r in rs.repos}
    unknown = sorted(set(revision) - set(DEFAULT_REVISIONS))
    if unknown:
        raise ValueError(f"revision given for unknown repositories {unknown}; the released files live in "
                         f"{list(DEFAULT_REVISIONS)}")
    return {r: revision.get(r, DEFAULT_REVISIONS[r]) for r in rs.repos}


# ---------------------------------------------------------------------------------------------
# The sha256 manifest: <maisi cache>/hub/manifest.json, keyed by repo@commit:path
# ---------------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {MANIFEST_FORMAT!r}")
        return dict(data["files"])
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise HubError(f"{path} is not a maisi hub manifest ({e}); delete it (the next download records the "
                       "files' sha256 again)") from e


def _verify(file: ReleasedFile, local: Path, revision: str, set_name: str,
            manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """Check `local` against its recorded sha256; return the new manifest entry on first sight, else None."""
    commit = snapshot_commit(local, file)
    key = f"{file.repo}@{commit}:{file.path}"
    recorded = manifest.get(key)
    digest = sha256_file(local)
    blob = local.resolve()
    # The hub names LFS blobs after their sha256; small git files are named by their git sha1 instead.
    expected, source = None, ""
    if recorded is not None:
        expected, source = recorded["sha256"], f"recorded in {manifest_path()} at first download"
    elif _SHA256.fullmatch(blob.name):
        expected, source = blob.name, "the hub's LFS sha256, the cached blob's name"
    if expected is not None and digest != expected:
        raise ChecksumMismatchError(
            f"{file.repo}/{file.path} at commit {commit}: the cached file {blob} has sha256 {digest}, expected "
            f"{expected} ({source}); it is damaged or was replaced. Delete it "
            f"(rm {blob}{'' if blob == local else f' {local}'}) and download it again: "
            f"`maisi download {set_name}`")
    if recorded is not None:
        return None
    return {key: {"repo": file.repo, "path": file.path, "commit": commit, "revision": revision,
                  "sha256": digest, "size": local.stat().st_size,
                  "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}}


def _record(entries: dict[str, Any]) -> None:
    if not entries:
        return
    path = manifest_path()
    files = _read_manifest(path)  # re-read just before writing: another process may have added entries
    files.update(entries)
    atomic_write_text(path, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True))


def _verified(rs: ReleasedSet, found: dict[ReleasedFile, Path], revisions: dict[str, str]) -> dict[str, Path]:
    manifest = _read_manifest(manifest_path())
    new: dict[str, Any] = {}
    try:
        for file, local in found.items():
            new.update(_verify(file, local, revisions[file.repo], rs.name, manifest) or {})
    finally:
        _record(new)  # files that matched stay recorded even when a later one fails
    return {f.path: p for f, p in found.items()}


# ---------------------------------------------------------------------------------------------
# Download and offline lookup
# ---------------------------------------------------------------------------------------------


class _Quiet(tqdm):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)
        super().__init__(*args, **{**kwargs, "disable": True})


def download_set(name: str, *, revision: str | Mapping[str, str] | None = None, token: str | None = None,
                 progress: bool = True, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Download (or find in the hub cache) every file of set `name`; repo path -> verified local path.

    `revision`: a branch, tag or commit for every repository of the set, or {repo: revision}; default
    `DEFAULT_REVISIONS`. `token`: a hub token (default: $HF_TOKEN or the stored login). `cache_dir`: the
    hub cache (default: $HF_HOME/hub). Offline with files missing raises `MissingFilesError`.
    """
    rs = released_set(name)
    revisions = _revisions(rs, revision)
    found: dict[ReleasedFile, Path] = {}
    for file in rs.files:
        rev = revisions[file.repo]
        try:
            local = hf_hub_download(file.repo, file.path, revision=rev, token=token, cache_dir=cache_dir,
                                    tqdm_class=None if progress else _Quiet)
        except LocalEntryNotFoundError as e:  # offline, or the hub unreachable, and not cached
            missing = [f"{f.repo}/{f.path}" for f in rs.files if f not in found]
            raise MissingFilesError(f"the hub cannot be reached (offline, HF_HUB_OFFLINE set, or no connection) "
                                    f"and {len(missing)} file(s) of "
                                    f"set {name!r} are not cached: {', '.join(missing)}. To get them, "
                                    f"{copy_over_help(name)}") from e
        except RevisionNotFoundError as e:
            raise HubError(f"{file.repo} has no revision {rev!r}; pass a branch, tag or commit hash of that "
                           "repository (default: main)") from e
        except RemoteEntryNotFoundError as e:
            raise HubError(f"{file.repo} has no file {file.path} at revision {rev!r}; the catalogue in "
                           "maisi.io.hub may be out of date, or pick a revision that has it") from e
        except (GatedRepoError, RepositoryNotFoundError) as e:
            raise HubError(f"the hub refused access to {file.repo} ({e.__class__.__name__}); check the "
                           "repository's terms on its model card, then give a token or set HF_TOKEN") from e
        except HfHubHTTPError as e:
            raise HubError(f"downloading {file.repo}/{file.path} failed: {e}") from e
        except _TRANSPORT_ERRORS as e:
            raise HubError(f"downloading {file.repo}/{file.path} failed ({e.__class__.__name__}: {e}); run the "
                           "same command again to retry") from e
        found[file] = Path(local)
    return _verified(rs, found, revisions)


def local_set(name: str, *, revision: str | Mapping[str, str] | None = None,
              cache_dir: str | Path | None = None, only: Sequence[str] | None = None) -> dict[str, Path]:
    """The files of set `name` from the hub cache only (no network); repo path -> verified local path.
    `only`: just these repo paths of the set (e.g. the mask database without the 2 GB UNet).

    Raises `MissingFilesError` naming every missing file and how to get them.
    """
    rs = released_set(name)
    revisions = _revisions(rs, revision)
    unknown = sorted(set(only or ()) - {f.path for f in rs.files})
    if unknown:
        raise ValueError(f"set {name!r} has no file(s) {unknown}; it has {[f.path for f in rs.files]}")
    found: dict[ReleasedFile, Path] = {}
    missing: list[str] = []
    for file in (f for f in rs.files if only is None or f.path in only):
        try:
            found[file] = Path(hf_hub_download(file.repo, file.path, revision=revisions[file.repo],
                                               cache_dir=cache_dir, local_files_only=True))
        except LocalEntryNotFoundError:
            missing.append(f"{file.repo}/{file.path} (revision {revisions[file.repo]})")
    if missing:
        raise MissingFilesError(f"{len(missing)} file(s) of set {name!r} are not in the hub cache: "
                                f"{', '.join(missing)}. To get them, {copy_over_help(name)}")
    return _verified(rs, found, revisions)
