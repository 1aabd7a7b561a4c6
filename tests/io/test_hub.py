"""maisi.io.hub and `maisi download` against a local stand-in for the Hugging Face hub (no internet)."""

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from huggingface_hub import constants

from maisi.cli import main
from maisi.config import MASK_PRESETS, PRESETS
from maisi.io import hub

LFS_SUFFIXES = hub.LFS_SUFFIXES  # served with their sha256 as ETag, like the hub's LFS files
HTML = b"<!doctype html><html><body>Mirror home</body></html>\n"


def _content(path: str) -> bytes:
    """Small stand-ins in the released formats."""
    if path.endswith(".pt"):
        buf = io.BytesIO()
        seed = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16)
        torch.save({"state_dict": {"w": torch.randn(64, generator=torch.Generator().manual_seed(seed))},
                    "scale_factor": torch.tensor(1.0)}, buf)
        return buf.getvalue()
    if path.endswith(".zip"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("mask_0000.nii.gz", b"not a real mask")
        return buf.getvalue()
    return json.dumps({"file": path}).encode()


CONTENT = {(f.repo, f.path): _content(f.path) for f in hub.FILES.values()}
COMMITS = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in hub.DEFAULT_REVISIONS}
REAL_SETS = hub.SETS


def _sets_sized_to_the_stand_ins() -> dict[str, hub.ReleasedSet]:
    """The catalogue with every known size replaced by its stand-in's, so that the size check applies to them."""
    files = {p: dataclasses.replace(f, approx_mb=len(CONTENT[(f.repo, p)]) / 1e6) if f.approx_mb else f
             for p, f in hub.FILES.items()}
    return {n: dataclasses.replace(s, files=tuple(files[f.path] for f in s.files)) for n, s in hub.SETS.items()}


def _etag(path: str, data: bytes) -> str:
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id


class FakeHub:
    """What hf_hub_download needs of the hub: HEAD/GET /{repo}/resolve/{revision}/{path}, with Range."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Message]] = []
        self.cut_first_get: set[str] = set()  # paths whose first GET stops halfway and drops the connection
        self.gated: set[str] = set()
        self.content = dict(CONTENT)  # what it serves; a test may swap a file for another
        self.missing: dict[str, str] = {}  # path -> X-Error-Code of its 404 ("": none, as some mirrors answer)
        self.html = False  # answer every file request with one HTML page (200, ETag, X-Repo-Commit, no LFS headers)
        self.commit_header = True  # send X-Repo-Commit, as a hub does and a plain web server does not
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                fake.serve(self, body=False)

            def do_GET(self):
                fake.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def gets(self, path: str = "") -> list[Message]:
        return [h for m, p, h in self.requests if m == "GET" and p.endswith(path)]

    def serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        with self.lock:
            self.requests.append((h.command, h.path, h.headers))
        parts = unquote(h.path).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":  # not a file: e.g. /api/... lookups of newer clients
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        org, name, _, revision, *rest = parts
        repo, path = f"{org}/{name}", "/".join(rest)
        error = None
        if repo not in COMMITS:
            error = "RepoNotFound"
        elif repo in self.gated and h.headers.get("Authorization") != "Bearer hf_good":
            error = "GatedRepo"
        elif revision not in ("main", COMMITS[repo]):
            error = "RevisionNotFound"
        elif (repo, path) not in self.content:
            error = "EntryNotFound"
        elif path in self.missing:
            error = self.missing[path]
        if error is not None and not self.html:
            h.send_response(401 if error == "GatedRepo" else 404)
            if error:
                h.send_header("X-Error-Code", error)
            if repo in COMMITS:
                h.send_header("X-Repo-Commit", COMMITS[repo])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = HTML if self.html else self.content[(repo, path)]
        start = 0
        if body and h.headers.get("Range"):
            start = int(h.headers["Range"].removeprefix("bytes=").split("-")[0])
        h.send_response(206 if start else 200)
        if self.commit_header:
            h.send_header("X-Repo-Commit", COMMITS.get(repo, "0" * 40))
        h.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"' if self.html else f'"{_etag(path, data)}"')
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        with self.lock:
            cut = path in self.cut_first_get
            self.cut_first_get.discard(path)
        h.wfile.write(data[start:len(data) // 2] if cut else data[start:])
        h.wfile.flush()
        h.close_connection = True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A fake hub on 127.0.0.1 that huggingface_hub talks to, an empty HF cache and an empty maisi cache."""
    server = FakeHub()
    # huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at import: set what they set.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf" / "agents.json"), raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("MAISI_CACHE", str(tmp_path / "maisi"))
    monkeypatch.setattr(hub, "SETS", _sets_sized_to_the_stand_ins())
    yield server
    server.close()


def _blob(path: Path) -> Path:
    return path.resolve()


def _cached(tmp_path: Path) -> list[Path]:
    """Snapshot links and blobs in the hub cache."""
    return [p for d in ("snapshots", "blobs") for p in (tmp_path / "hf" / "hub").glob(f"*/{d}/**/*")
            if p.is_file() or p.is_symlink()]


def test_catalogue_names_the_presets_and_all_holds_every_file():
    assert set(hub.SETS) - {"all"} <= set(PRESETS) | set(MASK_PRESETS)
    assert {f.path for f in hub.SETS["all"].files} == set(hub.FILES)
    for rs in hub.SETS.values():
        assert {f.path for f in rs.files} <= set(hub.FILES)


def test_download_set_fetches_every_file_into_the_hub_cache(fake_hub, tmp_path):
    paths = hub.download_set("rflow-ct", progress=False)
    rs = hub.SETS["rflow-ct"]
    assert list(paths) == [f.path for f in rs.files]
    snapshot = tmp_path / "hf" / "hub" / "models--nvidia--NV-Generate-CT" / "snapshots" / COMMITS[hub.CT]
    for f in rs.files:
        assert paths[f.path] == snapshot / f.path
        assert paths[f.path].read_bytes() == CONTENT[(f.repo, f.path)]
    weights = torch.load(paths["models/diff_unet_3d_rflow-ct.pt"], weights_only=True)
    assert weights["state_dict"]["w"].shape == (64,)
    # The manifest records each file's sha256 and the commit that "main" resolved to.
    files = json.loads(hub.manifest_path().read_text())["files"]
    assert len(files) == len(rs.files)
    entry = files[f"{hub.CT}@{COMMITS[hub.CT]}:models/autoencoder_v1.pt"]
    assert entry["sha256"] == hashlib.sha256(CONTENT[(hub.CT, "models/autoencoder_v1.pt")]).hexdigest()
    assert (entry["revision"], entry["commit"]) == ("main", COMMITS[hub.CT])
    # A second call finds everything in the cache: metadata requests only, no transfer.
    n_gets = len(fake_hub.gets())
    assert hub.download_set("rflow-ct", progress=False) == paths
    assert len(fake_hub.gets()) == n_gets


def test_dropped_transfer_resumes_with_a_range_request(fake_hub, monkeypatch):
    # huggingface_hub keeps what arrived and asks for the rest (Range) when the connection drops mid-file.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64)  # real files span many chunks; ours are tiny
    name = "models/diff_unet_3d_rflow-mr.pt"
    fake_hub.cut_first_get.add(name)
    paths = hub.download_set("rflow-mr", progress=False)
    data = CONTENT[(hub.MR, name)]
    ranges = [g.get("Range") for g in fake_hub.gets(name)]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))  # whole chunks that arrived
    assert 0 < resumed_at <= len(data) // 2, ranges
    assert paths[name].read_bytes() == data


@pytest.mark.parametrize("path, check", [
    ("models/autoencoder_v1.pt", "manifest"),  # recorded at first download
    ("datasets/all_anatomy_size_conditions.json", "manifest"),  # a git file: only the manifest knows it
    ("models/controlnet_3d_rflow-ct.pt", "lfs-name"),  # no manifest yet: the blob's sha256 name
])
def test_damaged_cached_file_is_refused_and_never_returned(fake_hub, path, check):
    paths = hub.download_set("rflow-ct", progress=False)
    blob = _blob(paths[path])
    good = hashlib.sha256(blob.read_bytes()).hexdigest()
    blob.write_bytes(blob.read_bytes()[:-1] + b"X")
    bad = hashlib.sha256(blob.read_bytes()).hexdigest()
    if check == "lfs-name":
        hub.manifest_path().unlink()
    for lookup in (lambda: hub.download_set("rflow-ct", progress=False), lambda: hub.local_set("rflow-ct")):
        with pytest.raises(hub.ChecksumMismatchError) as e:
            lookup()
        message = str(e.value)
        assert path in message and str(blob) in message and good in message and bad in message
        assert "maisi download rflow-ct" in message and "Delete it" in message


def test_mirror_answering_html_for_every_file_is_refused_and_nothing_kept(fake_hub, tmp_path, capsys):
    # Regression: a mirror that answered 200 with an HTML page (ETag, X-Repo-Commit, no LFS headers) got the page
    # cached as mask_generation_autoencoder.pt and its sha256 recorded, and `maisi download` said "sha256 checked".
    fake_hub.html = True
    with pytest.raises(hub.UnverifiedFileError) as e:
        hub.download_set("mask-ct", progress=False)
    message = str(e.value)
    assert f"{hub.CT}/models/mask_generation_autoencoder.pt" in message and fake_hub.url in message
    assert f"it is {len(HTML)} bytes" in message and "without an LFS sha256" in message and "HF_ENDPOINT" in message
    assert not hub.manifest_path().exists() and _cached(tmp_path) == []
    assert fake_hub.gets(".json") == []  # LFS files come first: no unverifiable small file was fetched
    assert main(["download", "mask-ct", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert "sha256 checked" not in out and "mask_generation_autoencoder.pt" in err
    with pytest.raises(hub.MissingFilesError):  # nothing left for a later run to use
        hub.local_set("mask-ct")
    fake_hub.html = False  # the mirror mended: the same command gets the released files
    paths = hub.download_set("mask-ct", progress=False)
    assert all(paths[f.path].read_bytes() == CONTENT[(f.repo, f.path)] for f in hub.SETS["mask-ct"].files)


@pytest.mark.parametrize("served, refused", [
    ("ten times the size", True),
    ("a tenth", True),
    ("the real catalogue's 21 MB", True),  # the ~1 KB stand-in against the sizes users get
    ("three times the size", False),  # within SIZE_FACTOR: the catalogue's sizes are approximate
])
def test_lfs_file_far_from_the_catalogue_size_is_refused(fake_hub, tmp_path, monkeypatch, served, refused):
    # Served with its own sha256 as ETag: a well-formed LFS answer, but not the file the catalogue describes.
    name = "models/mask_generation_autoencoder.pt"
    data = CONTENT[(hub.CT, name)]
    if served == "the real catalogue's 21 MB":
        monkeypatch.setattr(hub, "SETS", REAL_SETS)
    else:
        fake_hub.content[(hub.CT, name)] = {"ten times the size": data * 10, "a tenth": data[:len(data) // 10],
                                            "three times the size": data * 3}[served]
    if not refused:
        assert hub.download_set("mask-ct", progress=False)[name].read_bytes() == data * 3
        return
    with pytest.raises(hub.UnverifiedFileError) as e:
        hub.download_set("mask-ct", progress=False)
    message = str(e.value)
    assert name in message and fake_hub.url in message and "the catalogue expects about" in message
    assert not hub.manifest_path().exists() and _cached(tmp_path) == []


def test_lfs_files_are_fetched_before_small_files(fake_hub):
    # Small files have no sha256 to check them by: none is fetched until every LFS file of the set has passed.
    # In `all`, JSON files come before the zip and the MR models.
    name = "models/autoencoder_v2.pt"
    fake_hub.content[(hub.MR, name)] = CONTENT[(hub.MR, name)] * 10
    with pytest.raises(hub.UnverifiedFileError, match=name):
        hub.download_set("all", progress=False)
    assert fake_hub.gets(".json") == []


def test_cache_left_by_an_unchecked_html_mirror_is_refused_then_replaced(fake_hub, monkeypatch):
    # What maisi left before the LFS check: one HTML page cached for all three files, its sha256 recorded.
    check = hub._lfs_problem
    monkeypatch.setattr(hub, "_lfs_problem", lambda file, blob: None)
    fake_hub.html = True
    hub.download_set("mask-ct", progress=False)
    monkeypatch.setattr(hub, "_lfs_problem", check)
    name = "models/mask_generation_autoencoder.pt"
    with pytest.raises(hub.UnverifiedFileError) as e:  # offline lookups no longer vouch for it
        hub.local_set("mask-ct")
    assert name in str(e.value) and "maisi download mask-ct" in str(e.value)
    assert f"{hub.CT}@{COMMITS[hub.CT]}:{name}" not in json.loads(hub.manifest_path().read_text())["files"]
    fake_hub.html = False  # the mirror mended: download_set replaces the page wherever it was cached
    paths = hub.download_set("mask-ct", progress=False)
    assert all(paths[f.path].read_bytes() == CONTENT[(f.repo, f.path)] for f in hub.SETS["mask-ct"].files)
    assert hub.local_set("mask-ct") == paths


@pytest.mark.parametrize("error_code", ["", "EntryNotFound"])  # a bare 404 (some mirrors), the hub's own
def test_files_the_hub_answers_404_for_are_listed_as_not_found(fake_hub, capsys, error_code):
    # Regression: a mirror's 404 was reported as "the hub cannot be reached".
    missing = ["models/mask_generation_diffusion_unet.pt", "datasets/all_anatomy_size_conditions.json"]
    fake_hub.missing = dict.fromkeys(missing, error_code)
    with pytest.raises(hub.NotOnHubError) as e:
        hub.download_set("mask-ct", progress=False)
    message = str(e.value)
    listed = ", ".join(f"{hub.CT}/{p} (revision 'main')" for p in missing)
    assert f"2 file(s) of set 'mask-ct' not found at {fake_hub.url}: {listed}." in message
    assert "cannot be reached" not in message and "HF_ENDPOINT" in message
    # The file that is there was fetched, checked and recorded.
    assert list(json.loads(hub.manifest_path().read_text())["files"]) == [
        f"{hub.CT}@{COMMITS[hub.CT]}:models/mask_generation_autoencoder.pt"]
    assert main(["download", "mask-ct", "--quiet"]) == 2
    assert f"not found at {fake_hub.url}" in capsys.readouterr().err


def test_endpoint_that_is_not_a_hub_is_not_reported_as_unreachable(fake_hub):
    fake_hub.html, fake_hub.commit_header = True, False  # e.g. HF_ENDPOINT naming a plain web server
    with pytest.raises(hub.HubError) as e:
        hub.download_set("mask-ct", progress=False)
    message = str(e.value)
    assert "not as the Hugging Face hub does" in message and fake_hub.url in message and "HF_ENDPOINT" in message
    assert "cannot be reached" not in message


def test_offline_with_a_warm_cache_works(fake_hub, monkeypatch):
    paths = hub.download_set("rflow-mr-brain", progress=False)
    fake_hub.close()
    n = len(fake_hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.download_set("rflow-mr-brain", progress=False) == paths
    assert hub.local_set("rflow-mr-brain") == paths
    assert len(fake_hub.requests) == n


def test_offline_with_a_cold_cache_says_how_to_copy_the_files_over(fake_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for lookup in (lambda: hub.download_set("rflow-mr-brain", progress=False),
                   lambda: hub.local_set("rflow-mr-brain")):
        with pytest.raises(hub.MissingFilesError) as e:
            lookup()
        message = str(e.value)
        assert "models/autoencoder_v1.pt" in message and "models/diff_unet_3d_rflow-mr-brain_v1.pt" in message
        assert "maisi download rflow-mr-brain" in message and "--weights" in message
        assert "hub/models--nvidia--NV-Generate-CT" in message and "hub/models--nvidia--NV-Generate-MR-Brain" in message
    assert fake_hub.requests == []


def test_local_set_reads_only_the_cache_and_names_every_missing_file(fake_hub):
    hub.download_set("rflow-mr", progress=False)
    with pytest.raises(FileNotFoundError) as e:
        hub.local_set("rflow-ct")
    assert all(f.path in str(e.value) for f in hub.SETS["rflow-ct"].files)
    n = len(fake_hub.requests)
    assert hub.local_set("rflow-mr") == hub.download_set("rflow-mr", progress=False)
    assert len(fake_hub.requests) == n + len(hub.SETS["rflow-mr"].files)  # only download_set's HEADs


def test_revisions_pin_commits_per_repository(fake_hub):
    commit = COMMITS[hub.MR]
    paths = hub.download_set("rflow-mr", revision=commit, progress=False)
    assert all(commit in str(p) for p in paths.values())
    both = {hub.CT: COMMITS[hub.CT], hub.MR_BRAIN: COMMITS[hub.MR_BRAIN]}
    paths = hub.download_set("rflow-mr-brain", revision=both, progress=False)
    assert hub.local_set("rflow-mr-brain", revision=both) == paths
    with pytest.raises(ValueError, match="belongs to one repository"):
        hub.download_set("rflow-mr-brain", revision=COMMITS[hub.CT])
    with pytest.raises(ValueError, match="unknown repositories"):
        hub.download_set("rflow-mr", revision={"nvidia/NV-Generate-XR": "main"})
    with pytest.raises(hub.HubError, match="has no revision 'v9'"):
        hub.download_set("rflow-mr", revision="v9", progress=False)


def test_token_reaches_the_hub_and_a_refusal_says_so(fake_hub):
    fake_hub.gated.add(hub.MR)
    with pytest.raises(hub.HubError, match="HF_TOKEN"):
        hub.download_set("rflow-mr", progress=False)
    hub.download_set("rflow-mr", token="hf_good", progress=False)
    assert fake_hub.gets()[-1]["Authorization"] == "Bearer hf_good"


def test_cli_downloads_and_prints_where_files_went(fake_hub, capsys):
    assert main(["download", "rflow-mr", "--quiet"]) == 0
    out = capsys.readouterr().out
    for f in hub.SETS["rflow-mr"].files:
        assert f"snapshots/{COMMITS[hub.MR]}/{f.path}" in out
    assert f"--revision {hub.MR}={COMMITS[hub.MR]}" in out
    assert main(["download", "rflow-mr", "--quiet", "--revision", f"{hub.MR}={COMMITS[hub.MR]}"]) == 0


def test_cli_list_downloads_nothing(fake_hub, capsys, monkeypatch):
    monkeypatch.setattr(hub, "SETS", REAL_SETS)
    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert "rflow-ct" in out and "rflow-mr-brain" in out and "~2.1 GB" in out
    assert all(f.path in out for f in hub.FILES.values())
    assert fake_hub.requests == []


@pytest.mark.parametrize("argv, offline, needle", [
    (["download"], False, "name at least one set"),
    (["download", "rflow-xt"], False, "unknown set 'rflow-xt'"),
    (["download", "rflow-mr", "--revision", "v9"], False, "has no revision"),
    (["download", "rflow-mr", "--revision", "a", "--revision", "b"], False, "REPO=REV"),
    (["download", "rflow-mr"], True, "maisi download rflow-mr"),
])
def test_cli_errors_exit_2(fake_hub, monkeypatch, capsys, argv, offline, needle):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    assert main([*argv, "--quiet"]) == 2
    assert needle in capsys.readouterr().err


def test_cli_damaged_file_exits_2(fake_hub, capsys):
    paths = hub.download_set("rflow-mr", progress=False)
    _blob(paths["models/autoencoder_v2.pt"]).write_bytes(b"damaged")
    assert main(["download", "rflow-mr", "--quiet"]) == 2
    err = capsys.readouterr().err
    # Damaged here, and far from its size too: reported as damaged (not blamed on the endpoint and deleted).
    assert "sha256" in err and "damaged" in err and "refused" not in err


def test_cli_honours_hf_home_and_hf_endpoint(fake_hub, tmp_path):
    # The real environment variables, read by huggingface_hub at import in a fresh process.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_ENDPOINT=fake_hub.url, HF_HUB_OFFLINE="0",
               MAISI_CACHE=str(tmp_path / "maisi2"))
    # The catalogue's own sizes apply in a fresh process: serve an autoencoder_v2.pt of that size.
    ae = hub.FILES["models/autoencoder_v2.pt"]
    fake_hub.content[(ae.repo, ae.path)] = CONTENT[(ae.repo, ae.path)].ljust(int(ae.approx_mb * 1e6), b"\0")
    run = subprocess.run([sys.executable, "-m", "maisi", "download", "rflow-mr", "--quiet"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "home" / "hub" / "models--nvidia--NV-Generate-MR" / "snapshots" / COMMITS[hub.MR]
            / "models" / "autoencoder_v2.pt").is_file()
