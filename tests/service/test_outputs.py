"""`maisi serve`'s delivery fields on 127.0.0.1 with tiny random networks: `pre_signed_url` (the result zip PUT to
a local HTTP server that records it; a refused scheme; an upload answered 500) and `local_working_dir` (the
outputs written under an allowed root; paths outside it, through a symlink or relative, refused)."""

from __future__ import annotations

import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from maisi.cli import build_parser
from maisi.cli.serve import options_from_args
from maisi.service.config import ServeOptions
from pipeline_support import save_tiny_model
from service_support import SMALL, ThreadServer, options, zip_names

PAIR = {"sample_seed0_image.nii.gz", "sample_seed0_label.nii.gz"}


class Bucket:
    """An HTTP server on 127.0.0.1 standing in for S3: records every PUT; a path starting /fail answers 500."""

    def __init__(self) -> None:
        self.puts: list[tuple[str, dict[str, str], bytes]] = []
        bucket = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                bucket.puts.append((self.path, dict(self.headers), body))
                status = 500 if self.path.startswith("/fail") else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Bucket:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))[0]


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def server(model, allowed, tmp_path_factory, one_thread):
    with ThreadServer(options(model, tmp_path_factory.mktemp("work"), local_dirs=(str(allowed),))) as client:
        yield client


@pytest.fixture(scope="module")
def bucket():
    with Bucket() as b:
        yield b


def assert_pair_zip(body: bytes) -> None:
    assert PAIR <= set(zip_names(body))
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        assert z.testzip() is None and all(z.read(n) for n in PAIR)


# ---- pre_signed_url -----------------------------------------------------------------------------

def test_pre_signed_url_gets_the_zip(server, bucket):
    url = f"{bucket.base}/bucket/result.zip?X-Amz-Signature=secret"
    reply = server.post("/v1/maisi/run", {**SMALL, "pre_signed_url": url})
    assert reply.status == 200 and reply.headers["content-type"] == "application/zip", reply.body
    path, headers, body = bucket.puts[-1]
    assert path == "/bucket/result.zip?X-Amz-Signature=secret" and headers["Content-Type"] == "application/zip"
    assert body == reply.body  # the response still carries the zip, the same bytes
    assert_pair_zip(body)
    job = server.get(f"/v1/jobs/{reply.headers['x-maisi-job']}").json()
    assert job["state"] == "done" and f"uploaded to {bucket.base}/bucket/result.zip" in job["message"]
    assert "secret" not in job["message"]  # the signature is the credential: never shown


def test_failed_upload_fails_the_job_but_keeps_the_result(server, bucket):
    url = f"{bucket.base}/fail/result.zip?X-Amz-Signature=secret"
    job_id = server.post("/v1/jobs", {**SMALL, "pre_signed_url": url}).json()["id"]
    job = server.wait_job(job_id)
    assert job["state"] == "failed" and "HTTP 500" in job["error"] and "/fail/result.zip" in job["error"], job
    assert "secret" not in job["error"] and job["result"] == f"/v1/jobs/{job_id}/result"
    assert bucket.puts[-1][0].startswith("/fail/")
    result = server.get(job["result"])
    assert result.status == 200
    assert_pair_zip(result.body)
    reply = server.post("/v1/maisi/run", {**SMALL, "pre_signed_url": url})
    assert reply.status == 500 and "HTTP 500" in reply.detail and reply.json()["job"]["result"], reply.body


def test_failed_connection_fails_the_job(server):
    with Bucket() as gone:
        url = gone.base + "/x.zip"
    job = server.wait_job(server.post("/v1/jobs", {**SMALL, "pre_signed_url": url}).json()["id"])
    assert job["state"] == "failed" and "pre_signed_url: the upload to" in job["error"], job


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.zip", "file:///etc/passwd", "127.0.0.1/x.zip", "http://"])
def test_pre_signed_url_needs_http_or_https(server, url):
    for route in ("/v1/plan", "/v1/jobs"):
        reply = server.post(route, {**SMALL, "pre_signed_url": url})
        assert reply.status == 400 and "pre_signed_url must be an http:// or https:// URL" in reply.detail, reply.body


# ---- local_working_dir --------------------------------------------------------------------------

def test_local_working_dir_gets_the_outputs(server, allowed):
    target = allowed / "runs" / "one"
    reply = server.post("/v1/maisi/run", {**SMALL, "local_working_dir": str(target)})
    assert reply.status == 200, reply.body
    written = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with zipfile.ZipFile(io.BytesIO(reply.body)) as z:
        assert written == {n: z.read(n) for n in z.namelist()}  # the zip's files, no temporary left over
    assert PAIR <= set(written)


def test_local_working_dir_outside_the_allowed_root(server, allowed, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    for value, status, message in ((str(outside), 403, "outside the folders this server allows"),
                                   (str(allowed / "link" / "x"), 403, "outside the folders this server allows"),
                                   (str(allowed / ".." / "escape"), 403, "outside the folders"),
                                   ("relative/dir", 400, "must be an absolute path")):
        for route in ("/v1/plan", "/v1/jobs"):
            reply = server.post(route, {**SMALL, "local_working_dir": value})
            assert reply.status == status and message in reply.detail and "local_working_dir" in reply.detail, \
                (value, reply.body)
    assert not list(outside.iterdir())


def test_allow_local_dir_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    args = build_parser().parse_args(["serve", "--allow-local-dir", "a", "--allow-local-dir", str(tmp_path)])
    assert options_from_args(args).local_dirs == (str(tmp_path / "a"), str(tmp_path))
    assert options_from_args(build_parser().parse_args(["serve"])).local_dirs == ()
    with pytest.raises(ValueError, match="existing folder"):
        ServeOptions(local_dirs=(str(tmp_path / "missing"),))
