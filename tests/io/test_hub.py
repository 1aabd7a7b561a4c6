"""maisi.io.hub and `maisi download` against a local stand-in for the Hugging Face hub (no internet)."""

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

LFS_SUFFIXES = (".pt", ".zip")  # served with their sha256 as ETag, like the hub's LFS files


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
        elif (repo, path) not in CONTENT:
            error = "EntryNotFound"
        if error:
            h.send_response(401 if error == "GatedRepo" else 404)
            h.send_header("X-Error-Code", error)
            if repo in COMMITS:
                h.send_header("X-Repo-Commit", COMMITS[repo])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = CONTENT[(repo, path)]
        start = 0
        if body and h.headers.get("Range"):
            start = int(h.headers["Range"].removeprefix("bytes=").split("-")[0])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMITS[repo])
        h.send_header("ETag", f'"{_etag(path, data)}"')
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
    yield server
    server.close()


def _blob(path: Path) -> Path:
    return path.resolve()


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


def test_cli_list_downloads_nothing(fake_hub, capsys):
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
    assert "sha256" in capsys.readouterr().err


def test_cli_honours_hf_home_and_hf_endpoint(fake_hub, tmp_path):
    # The real environment variables, read by huggingface_hub at import in a fresh process.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_ENDPOINT=fake_hub.url, HF_HUB_OFFLINE="0",
               MAISI_CACHE=str(tmp_path / "maisi2"))
    run = subprocess.run([sys.executable, "-m", "maisi", "download", "rflow-mr", "--quiet"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "home" / "hub" / "models--nvidia--NV-Generate-MR" / "snapshots" / COMMITS[hub.MR]
            / "models" / "autoencoder_v2.pt").is_file()
