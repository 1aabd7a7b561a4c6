"""NVIDIA's released MAISI files on the Hugging Face hub: the catalogue, download, offline lookup, sha256 checks.

Downloads go through `huggingface_hub.hf_hub_download`, so the hub cache, `HF_HOME`, `HF_ENDPOINT`,
`HF_HUB_OFFLINE` and `HF_TOKEN` work as everywhere else. Every file's sha256 is recorded at first sight in
a manifest under maisi's cache folder and checked on every later call; a file that no longer matches is
never returned. The large files (.pt, .zip) are LFS files: the hub names each by its sha256, so one that arrives
without that name, or far from the catalogue's size, did not come from the hub as released and is refused before
anything is recorded.

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

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    FileMetadataError,
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
# The released repositories store these as LFS files; the others (JSON) are small git files.
LFS_SUFFIXES = (".pt", ".zip")
# An LFS file whose size is outside [catalogue size / SIZE_FACTOR, catalogue size * SIZE_FACTOR] is refused: the
# catalogue's estimates are fp32 weights, which a checkpoint may exceed a few times over; an HTML page, an error
# page or another model's file is far outside.
SIZE_FACTOR = 4.0
# The HTTP library's base error (httpx in huggingface_hub 1.x, httpx2 in 2.x): a transfer that failed
# after huggingface_hub's own retries.
_TRANSPORT_ERRORS = tuple(b for b in HfHubHTTPError.__bases__ if b is not OSError)


class HubError(ValueError):
    """The hub refused a request: unknown revision, missing file, gated or private repository."""


class ChecksumMismatchError(HubError):
    """A cached file whose sha256 is not the one recorded for it."""


class UnverifiedFileError(HubError):
    """A released LFS file (.pt, .zip) that the hub did not name by its sha256, or far from the catalogue's size."""


class NotOnHubError(HubError):
    """The hub (or the mirror in HF_ENDPOINT) answered 404 for released files: they are not there."""


class MissingFilesError(FileNotFoundError):
    """Released files that are not in the local cache and cannot be downloaded now (offline)."""


@dataclass(frozen=True)
class ReleasedFile:
    """One file NVIDIA published: where it lives on the hub and what it holds."""

    repo: str
    path: str  # path inside the repository
    component: Component
    approx_mb: float | None  # approximate download size; None where not known

    @property
    def lfs(self) -> bool:
        return PurePosixPath(self.path).suffix in LFS_SUFFIXES


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


def _key(repo: str, commit: str, path: str) -> str:
    return f"{repo}@{commit}:{path}"


def _lfs_problem(file: ReleasedFile, blob: Path) -> str | None:
    """Why the cached blob of an LFS file cannot be the released file, from its name and size; None if it can be
    (its content is then checked against the sha256 that names it)."""
    if not file.lfs:
        return None
    size = blob.stat().st_size
    expected = "" if file.approx_mb is None else f" (the catalogue expects about {file.approx_mb:g} MB)"
    if not _SHA256.fullmatch(blob.name):
        return (f"it is {size:,} bytes{expected} and came without an LFS sha256 (it was stored under its ETag "
                f"{blob.name!r}; the hub names an LFS file by its sha256), so its content cannot be checked")
    if file.approx_mb is not None and not file.approx_mb / SIZE_FACTOR <= size / 1e6 <= file.approx_mb * SIZE_FACTOR:
        return f"it is {size:,} bytes{expected}, more than {SIZE_FACTOR:g} times off"
    return None


def _verify(file: ReleasedFile, local: Path, revision: str, set_name: str,
            manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """Check `local` against its recorded sha256; return the new manifest entry on first sight, else None."""
    commit = snapshot_commit(local, file)
    key = _key(file.repo, commit, file.path)
    blob = local.resolve()
    rm = f"rm {blob}{'' if blob == local else f' {local}'}"
    recorded = manifest.get(key)
    digest = sha256_file(local)
    # The hub names LFS blobs after their sha256; small git files are named by their git sha1 instead.
    expected, source = None, ""
    if recorded is not None:
        expected, source = recorded["sha256"], f"recorded in {manifest_path()} at first download"
    elif _SHA256.fullmatch(blob.name):
        expected, source = blob.name, "the hub's LFS sha256, the cached blob's name"
    if expected is not None and digest != expected:
        raise ChecksumMismatchError(
            f"{file.repo}/{file.path} at commit {commit}: the cached file {blob} has sha256 {digest}, expected "
            f"{expected} ({source}); it is damaged or was replaced. Delete it ({rm}) and download it again: "
            f"`maisi download {set_name}`")
    problem = _lfs_problem(file, blob)
    if problem is not None:  # e.g. cached from a mirror that answered with HTML, before maisi checked for that
        _record({}, drop=[key])  # its sha256, if recorded then, vouches for nothing
        raise UnverifiedFileError(
            f"{file.repo}/{file.path} at commit {commit}: the cached file {blob} is refused: {problem}. It is not the "
            f"file as the hub released it. Delete it ({rm}) and download it again with HF_ENDPOINT unset or naming a "
            f"working mirror: `maisi download {set_name}`")
    if recorded is not None:
        return None
    return {key: {"repo": file.repo, "path": file.path, "commit": commit, "revision": revision,
                  "sha256": digest, "size": local.stat().st_size,
                  "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}}


def _record(entries: Mapping[str, Any], drop: Sequence[str] = ()) -> None:
    """Add `entries` to the manifest and remove the keys in `drop`."""
    if not entries and not drop:
        return
    path = manifest_path()
    files = _read_manifest(path)  # re-read just before writing: another process may have added entries
    if not entries and not set(drop) & set(files):
        return
    files.update(entries)
    for key in drop:
        files.pop(key, None)
    atomic_write_text(path, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True))


def _verified(rs: ReleasedSet, found: dict[ReleasedFile, Path], revisions: dict[str, str]) -> dict[str, Path]:
    manifest = _read_manifest(manifest_path())
    new: dict[str, Any] = {}
    try:
        for file, local in found.items():
            new.update(_verify(file, local, revisions[file.repo], rs.name, manifest) or {})
    finally:
        _record(new)  # files that matched stay recorded even when a later one fails
    return {f.path: found[f] for f in rs.files if f in found}


def _discard(file: ReleasedFile, local: Path) -> None:
    """Remove a refused file from the hub cache and the manifest, so that no later run uses it; with it every
    snapshot link to the same blob (a mirror that answers every request with one page gives them one blob)."""
    blob = local.resolve()
    snapshots = local.parents[len(PurePosixPath(file.path).parts)]
    links = [p for p in snapshots.rglob("*") if p.is_symlink() and p.resolve() == blob] or [local]
    keys = []
    for link in links:  # huggingface_hub returns an existing snapshot link without checking it: remove them
        commit, *path = link.relative_to(snapshots).parts
        keys.append(_key(file.repo, commit, "/".join(path)))
        link.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
    _record({}, drop=keys)


# ---------------------------------------------------------------------------------------------
# Download and offline lookup
# ---------------------------------------------------------------------------------------------


class _Quiet(tqdm):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)
        super().__init__(*args, **{**kwargs, "disable": True})


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from (huggingface_hub wraps a failed metadata request)."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__
    return chain


def _not_found(error: BaseException) -> bool:
    """Whether the hub answered 404 (no such repository, revision or file), rather than not answering."""
    return any(isinstance(e, (RemoteEntryNotFoundError, RevisionNotFoundError)) or (
        isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None) == 404) for e in _causes(error))


def _not_found_advice(file: ReleasedFile, revision: str, error: BaseException) -> str:
    """What to do about a 404 for `file`."""
    if any(isinstance(e, RevisionNotFoundError) for e in _causes(error)):
        return (f"{file.repo} has no revision {revision!r}; pass a branch, tag or commit hash of that repository "
                "(default: main)")
    if any(isinstance(e, RepositoryNotFoundError) for e in _causes(error)):
        return f"{constants.ENDPOINT} has no repository {file.repo}; check HF_ENDPOINT and the mirror it names"
    return ("if HF_ENDPOINT names a mirror, it does not hold these files (check it, or unset HF_ENDPOINT to use "
            "https://huggingface.co); otherwise the catalogue in maisi.io.hub may be out of date, or pick a revision "
            "that has them")


def _download_error(rs: ReleasedSet, file: ReleasedFile, error: Exception, missing: list[str]) -> Exception:
    """The error to raise for a failed hf_hub_download that is not a 404."""
    where = f"{file.repo}/{file.path}"
    if isinstance(error, LocalEntryNotFoundError):
        metadata = [e for e in _causes(error) if isinstance(e, FileMetadataError)]
        if metadata:  # the endpoint answered, without what a hub sends (X-Repo-Commit, ETag)
            return HubError(f"{constants.ENDPOINT} answered for {where}, but not as the Hugging Face hub does "
                            f"({metadata[0]}); check HF_ENDPOINT and the mirror it names")
        return MissingFilesError(f"the hub cannot be reached (offline, HF_HUB_OFFLINE set, or no connection) and "
                                 f"{len(missing)} file(s) of set {rs.name!r} are not cached: {', '.join(missing)}. "
                                 f"To get them, {copy_over_help(rs.name)}")
    if isinstance(error, (GatedRepoError, RepositoryNotFoundError)):
        return HubError(f"the hub refused access to {file.repo} ({error.__class__.__name__}); check the "
                        "repository's terms on its model card, then give a token or set HF_TOKEN")
    if isinstance(error, HfHubHTTPError):
        return HubError(f"downloading {where} failed: {error}")
    return HubError(f"downloading {where} failed ({error.__class__.__name__}: {error}); run the same command "
                    "again to retry")


def _refused(file: ReleasedFile, revision: str, set_name: str, problem: str) -> UnverifiedFileError:
    endpoint = constants.ENDPOINT
    return UnverifiedFileError(
        f"refused {file.repo}/{file.path} (revision {revision!r}) from {endpoint}: {problem}. The released .pt and "
        ".zip files are LFS files, which the hub serves under their sha256 (the X-Linked-Etag or ETag header); an "
        "endpoint that answers with an HTML page, an error page or another file does not. Nothing was recorded and "
        f"the download was deleted. Check HF_ENDPOINT and the mirror it names ({endpoint}; unset, it is "
        f"https://huggingface.co), then run `maisi download {set_name}` again")


def download_set(name: str, *, revision: str | Mapping[str, str] | None = None, token: str | None = None,
                 progress: bool = True, cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Download (or find in the hub cache) every file of set `name`; repo path -> verified local path.

    `revision`: a branch, tag or commit for every repository of the set, or {repo: revision}; default
    `DEFAULT_REVISIONS`. `token`: a hub token (default: $HF_TOKEN or the stored login). `cache_dir`: the
    hub cache (default: $HF_HOME/hub). Offline with files missing raises `MissingFilesError`; files that the
    hub answers 404 for raise `NotOnHubError` (after the others are fetched); an LFS file that does not come
    as the hub serves it raises `UnverifiedFileError`, before anything is recorded.
    """
    rs = released_set(name)
    revisions = _revisions(rs, revision)
    found: dict[ReleasedFile, Path] = {}
    absent: dict[ReleasedFile, str] = {}  # file -> what to do about the 404
    # LFS files first: an endpoint that does not serve them as the hub does is caught before any small file,
    # which has no sha256 to check against, is fetched from it.
    for file in sorted(rs.files, key=lambda f: not f.lfs):
        rev = revisions[file.repo]
        cached = try_to_load_from_cache(file.repo, file.path, cache_dir=cache_dir, revision=rev)
        if isinstance(cached, str) and file.lfs and not _SHA256.fullmatch(Path(cached).resolve().name):
            _discard(file, Path(cached))  # never checkable (fetched from an endpoint that gave no sha256): fetch again
            cached = None
        try:
            local = Path(hf_hub_download(file.repo, file.path, revision=rev, token=token, cache_dir=cache_dir,
                                         tqdm_class=None if progress else _Quiet))
        except (LocalEntryNotFoundError, HfHubHTTPError, *_TRANSPORT_ERRORS) as e:
            if not _not_found(e):
                raise _download_error(rs, file, e, [f"{f.repo}/{f.path}" for f in rs.files if f not in found]) from e
            absent[file] = _not_found_advice(file, rev, e)
            continue
        # A file fetched now is checked here; one that was cached already is _verify's (a damaged one is reported
        # as damaged there, not blamed on the endpoint).
        problem = None if cached is not None and Path(cached) == local else _lfs_problem(file, local.resolve())
        if problem is not None:
            _discard(file, local)
            raise _refused(file, rev, name, problem)
        found[file] = local
    paths = _verified(rs, found, revisions)
    if absent:
        listed = [f"{f.repo}/{f.path} (revision {revisions[f.repo]!r})" for f in rs.files if f in absent]
        raise NotOnHubError(f"{len(listed)} file(s) of set {name!r} not found at {constants.ENDPOINT}: "
                            f"{', '.join(listed)}. The endpoint answered (HTTP 404), so it is reachable; "
                            f"{'; '.join(dict.fromkeys(absent.values()))}")
    return paths


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
