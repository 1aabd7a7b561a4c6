"""`maisi serve` on 127.0.0.1 with tiny random networks: the NIM's routes and payloads, every class of bad payload
answered 4xx with the library's message, mask uploads, the bearer token, and the upload and rate limits."""

from __future__ import annotations

import asyncio
import io
import socket
import zipfile
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maisi.io.formats import read_label
from maisi.io.volume import read_volume
from maisi.labels import label_id
from maisi.service.config import ServeOptions
from maisi.service.guard import Guard
from pipeline_support import save_tiny_model
from service_support import SMALL, ThreadServer, options, zip_names

TOKEN = "s3cret-token"
LIVER = label_id("liver")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))[0]


@pytest.fixture(scope="module")
def server(model, tmp_path_factory, one_thread):
    """No token, no NIM grid limits (the tiny model makes 32³ volumes), a 1 MB body limit."""
    with ThreadServer(options(model, tmp_path_factory.mktemp("work"), max_upload_mb=1.0, max_samples=4)) as client:
        yield client


@pytest.fixture(scope="module")
def nim_server(model, tmp_path_factory, one_thread):
    """The NIM's grid limits on, and a bearer token."""
    with ThreadServer(options(model, tmp_path_factory.mktemp("nim"), nim_limits="on", token=TOKEN)) as client:
        yield client


# ---- the NIM's routes and payloads ---------------------------------------------------------------

def test_nim_info_routes(nim_server):
    assert nim_server.get("/v1/health/live").json() == {"status": "live"}
    assert nim_server.get("/v1/health/ready").json() == {"status": "ready"}
    assert "Apache" in nim_server.get("/v1/license").json()["text"]
    info = nim_server.get("/v1/maisi/info").json()
    assert info["labels"]["liver"] == LIVER and info["image_output_ext"][0] == ".nii.gz"
    assert info["nim_limits"]["output_size_xy"] == [256, 384, 512] and "num_output_samples" in info["fields"]


# Payloads as NVIDIA's NIM documentation writes them → the grid and maisi regions they resolve to.
NIM_EXAMPLES = [
    ({"num_output_samples": 1, "body_region": ["abdomen"], "anatomy_list": ["liver", "spleen"],
      "output_size": [512, 512, 512], "spacing": [1.0, 1.0, 1.0], "image_output_ext": ".nii.gz",
      "label_output_ext": ".nii.gz"}, [512, 512, 512], [1.0, 1.0, 1.0], ["abdomen"]),
    # NVIDIA's example asks for "lung tumor": the test's phantom database has none (see BAD), so the heart here
    ({"num_output_samples": 2, "body_region": ["chest"], "anatomy_list": ["heart"], "output_size": [256, 256, 256],
      "spacing": [1.5, 1.5, 1.5], "controllable_anatomy_size": [], "pre_signed_url": "", "local_working_dir": ""},
     [256, 256, 256], [1.5, 1.5, 1.5], ["chest"]),
    ({"num_output_samples": 1, "body_region": ["head", "thorax"], "output_size": [384, 384, 768],
      "spacing": [0.8, 0.8, 5.0], "image_output_ext": ".nrrd", "label_output_ext": ".nrrd"},
     [384, 384, 768], [0.8, 0.8, 5.0], ["head_neck", "chest"]),
    ({"num_output_samples": 1, "body_region": ["pelvis", "lower"], "output_size": [256, 256, 128],
      "spacing": [0.5, 0.5, 0.5], "image_output_ext": ".dcm", "label_output_ext": ".dcm"},
     [256, 256, 128], [0.5, 0.5, 0.5], ["pelvis"]),
]


@pytest.mark.parametrize("payload, size, spacing, regions", NIM_EXAMPLES)
def test_nim_payload_examples_are_accepted(nim_server, payload, size, spacing, regions):
    reply = nim_server.post("/v1/plan", payload)
    assert reply.status == 200, reply.body
    plan = reply.json()
    assert (plan["size"], plan["spacing"], plan["body_region"]) == (size, spacing, regions)


def test_nim_run_answers_a_zip_of_image_label_pairs(server, tmp_path):
    payload = {**SMALL, "num_output_samples": 2, "image_output_ext": ".nrrd", "label_output_ext": ".nii"}
    reply = server.post("/v1/maisi/run", payload)
    assert reply.status == 200 and reply.headers["content-type"] == "application/zip", reply.body
    names = zip_names(reply.body)
    for seed in (0, 1):
        assert {f"sample_seed{seed}_image.nrrd", f"sample_seed{seed}_label.nii"} <= set(names)
    zipfile.ZipFile(io.BytesIO(reply.body)).extractall(tmp_path)
    image, label = read_volume(tmp_path / "sample_seed1_image.nrrd"), read_label(tmp_path / "sample_seed1_label.nii")
    assert image.array.shape == label.array.shape == (32, 32, 32)
    assert np.allclose(np.abs(np.diag(image.affine))[:3], 8.0)


# ---- bad payloads: 4xx with the message the library gives --------------------------------------

BAD = [  # (change to SMALL, or a raw body; status; a piece of the message)
    (b"{not json", 400, "Invalid JSON"),
    ({"num_output_samples": None}, 400, "num_output_samples"),
    ({"num_output_samples": 0}, 400, "num_output_samples must be in 1..4"),
    ({"num_output_samples": 5}, 400, "num_output_samples must be in 1..4"),
    ({"body_region": []}, 400, "body_region needs at least one"),
    ({"body_region": ["legs"]}, 400, "body_region 'legs' is not a body region"),
    ({"body_region": ["pelvis", "head", "abdomen"]}, 200, ""),  # a list spans its regions
    ({"colour": "red"}, 400, "colour: unknown field"),
    ({"output_size": ["big", 32, 32]}, 400, "output_size.0"),
    ({"output_size": [32, 32]}, 400, "output_size takes 3 values"),
    ({"output_size": [48, 32, 32]}, 400, "must be a multiple of 32"),
    ({"spacing": [8.0, -1.0, 8.0]}, 400, "spacing must be positive"),
    ({"anatomy_list": ["livr"]}, 400, "unknown anatomy name 'livr'; did you mean 'liver'"),
    ({"tumour": ["liver"]}, 400, "is not a tumour that can be inpainted"),
    ({"modality": "xray"}, 400, "xray"),
    ({"steps": 0}, 400, "steps must be in 1.."),
    ({"seed": -1}, 400, "seed must be >= 0"),
    ({"memory_gb": 0}, 400, "memory_gb must be > 0"),
    ({"image_output_ext": ".png"}, 400, "image_output_ext '.png' is not an output format maisi writes"),
    ({"label_output_ext": "nii"}, 400, "label_output_ext 'nii' is not an output format"),
    ({"precision": "fp8"}, 400, "precision must be one of"),
    ({"precision": "fp16"}, 400, "fp16 is for GPUs"),
    # the tiny model has no mask generation model: 400 from the pipeline's plan, or 422 where the pipeline has none
    ({"controllable_anatomy_size": [["liver", 0.5]]}, (400, 422), "mask generation model"),
    ({"controllable_anatomy_size": [["livers", 0.5]]}, 400, "unknown structure (did you mean 'liver'?)"),
    ({"controllable_anatomy_size": [["liver", 2.0]]}, 400, "size must be in [0, 1] or -1"),
    ({"pre_signed_url": "ftp://example.org/upload"}, 400, "pre_signed_url must be an http:// or https:// URL"),
    ({"local_working_dir": "/data"}, 422, "local_working_dir is not enabled on this server"),  # no --allow-local-dir
    ({"local_working_dir": "/data"}, 422, "--allow-local-dir PATH"),
    ({"mask_mapping": {"1": "liver"}}, 400, "mask_mapping needs an uploaded mask"),
    # what no mask of the database shows, and a budget no decode fits: refused now, not failed as a job
    ({"anatomy_list": ["liver", "brain"]}, 400, "no mask in the database shows chest with liver, brain"),
    ({"anatomy_list": ["lung tumor"]}, 400, "no mask in the database shows chest with lung tumor"),
    ({"body_region": ["head"], "tumour": ["hepatic tumor"]}, 400, "no mask in the database shows head_neck with liver"),
    ({"memory_gb": 1e-6}, 400, "Raise memory_gb to"),
    # strict types: no string or boolean for a number, no string for a boolean; integers fill float fields
    ({"num_output_samples": "1"}, 400, 'num_output_samples: Input should be a valid integer, got "1"'),
    ({"num_output_samples": True}, 400, "num_output_samples: Input should be a valid integer, got true"),
    ({"seed": 1.5}, 400, "seed: Input should be a valid integer, got 1.5"),
    ({"quality_check": "no"}, 400, 'quality_check: Input should be a valid boolean, got "no"'),
    ({"spacing": [8.0, "8", 8.0]}, 400, 'spacing.1: Input should be a valid number, got "8"'),
    ({"spacing": [8, 8, 8], "memory_gb": 4, "tumour": ["lung tumor"], "quality_check": True}, 200, ""),
]


@pytest.mark.parametrize("change, status, message", BAD, ids=[str(c)[:40] for c, _, _ in BAD])
def test_bad_payloads_get_4xx_with_a_clear_message(server, change, status, message):
    if isinstance(change, bytes):
        body = change
    else:
        body = {k: v for k, v in {**SMALL, **change}.items() if v is not None}
    for route in ("/v1/plan", "/v1/jobs", "/v1/maisi/run"):
        if isinstance(body, bytes):
            reply = server.post(route, data=body, headers={"Content-Type": "application/json"})
        else:
            reply = server.post(route, body)
        if status == 200:
            assert reply.status in (200, 202), reply.body
            break
        assert reply.status in (status if isinstance(status, tuple) else (status,)), reply.body
        assert message in reply.detail, reply.detail


def test_nim_grid_limits(nim_server):
    for change, message in (({"output_size": [32, 32, 32]}, "x and y must be in [256, 384, 512]"),
                            ({"output_size": [256, 256, 100]}, "z in 128..768"),
                            ({"output_size": [256, 256, 128], "spacing": [1.0, 1.0, 8.0]}, "each in 0.5..5.0 mm")):
        reply = nim_server.post("/v1/plan", {**SMALL, **change})
        assert reply.status == 400 and message in reply.detail, reply.body


@pytest.mark.parametrize("change", [{"steps": 0}, {"anatomy_list": ["brain"]}, {"memory_gb": 1e-6}])
def test_nothing_is_queued_or_left_behind_by_bad_requests(server, change):
    def ids() -> set[str]:
        return {j["id"] for j in server.get("/v1/jobs?limit=1000").json()["jobs"]}

    def folders() -> set[Path]:
        return set((server.work_dir / "jobs").glob("*"))

    before, kept = ids(), folders()
    for route in ("/v1/jobs", "/v1/maisi/run"):
        assert server.post(route, {**SMALL, **change}).status == 400
    assert ids() == before and folders() == kept


# ---- the job list ------------------------------------------------------------------------------

def test_jobs_limit(server):
    for _ in range(2):
        assert server.post("/v1/jobs", SMALL).status == 202
    def ids(query: str = "") -> list[str]:
        return [j["id"] for j in server.get(f"/v1/jobs{query}").json()["jobs"]]

    newest = ids("?limit=1000")
    assert len(newest) >= 2 and ids() == newest[:100] and ids("?limit=1") == newest[:1]
    for limit in ("0", "-1", "1001", "99999999999999999999999", "abc", "1.5", ""):
        reply = server.get(f"/v1/jobs?limit={limit}")
        assert reply.status == 400 and reply.detail == f"limit must be an integer in 1..1000, got {limit!r}", reply.body


# ---- mask upload -------------------------------------------------------------------------------

def label_file(ids: tuple[int, ...]) -> bytes:
    label = np.zeros((32, 32, 32), np.uint8)
    for k, i in enumerate(ids):
        label[8 + 4 * k:12 + 4 * k, 8:24, 8:24] = i
    img = nib.Nifti1Image(label, np.diag([8.0, 8.0, 8.0, 1.0]))
    return img.to_bytes()


def test_mask_upload_is_followed(server, tmp_path):
    payload = {**SMALL, "anatomy_list": ["liver"]}
    reply = server.upload("/v1/jobs", payload, {"mask": ("mine.nii", label_file((LIVER,)))})
    assert reply.status == 202, reply.body
    job = server.wait_job(reply.json()["id"])
    assert job["state"] == "done", job
    result = server.get(f"/v1/jobs/{job['id']}/result")
    with zipfile.ZipFile(io.BytesIO(result.body)) as z:
        z.extract("sample_seed0_label.nii.gz", tmp_path)
    label = read_label(tmp_path / "sample_seed0_label.nii.gz").array
    assert (label == LIVER).sum() > 0


@pytest.mark.parametrize("files, payload, message", [
    ({"mask": ("mine.png", b"\x89PNG")}, {}, "upload a label map ending in .nii.gz, .nii, .nrrd"),
    ({"mask": ("mine.nii.gz", b"not a volume")}, {}, "uploaded mask.nii.gz: cannot read as NIfTI"),
    ({"mask": ("mine.nii", label_file((3,)))}, {"anatomy_list": ["liver"]}, "lacks the requested anatomy"),
])
def test_bad_mask_uploads(server, files, payload, message):
    reply = server.upload("/v1/plan", {**SMALL, **payload}, files)
    assert reply.status == 400 and message in reply.detail, reply.body


class Parts(list):
    """(field, (file name, bytes)) pairs for `Client.upload`, where a field may come twice."""

    def items(self):
        return self


@pytest.mark.parametrize("files, message", [
    (Parts([("mask", ("a.nii", label_file((LIVER,)))), ("mask", ("b.nii", label_file((LIVER,))))]),
     "multipart part 'mask' is sent 2 times; send it once"),
    ({"mask": ("a.nii", label_file((LIVER,))), "masks": ("b.nii", b"")},
     "multipart part 'masks' is not one this route reads; send 'payload' (the JSON payload) and, optionally, one 'mask'"),
    ({"payload": ("p.json", b"{}")}, "multipart part 'payload' is sent 2 times"),
])
def test_multipart_parts_are_named_once_each(server, files, message):
    for route in ("/v1/plan", "/v1/jobs"):
        reply = server.upload(route, SMALL, files)
        assert reply.status == 400 and message in reply.detail, reply.body


def test_upload_limit_declared(server):
    """A body whose declared length passes the limit is refused before it is read (so the client sends none)."""
    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {2 << 20}\r\n\r\n".encode())
        reply = b""
        while b"}" not in reply and (chunk := s.recv(65536)):  # the head and the JSON body may come apart
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"limit of 1 MB" in reply, reply


def test_upload_limit_streamed():
    """A body without a declared length is counted as it arrives and refused once past the limit."""
    sent: list[dict] = []

    async def app(scope, receive, send):  # reads the whole body, as a route does
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        return {"type": "http.request", "body": b"\0" * (256 << 10), "more_body": True}

    async def send(message):
        sent.append(message)

    guard = Guard(app, ServeOptions(max_upload_mb=1.0, rate_limit=0))
    asyncio.run(guard({"type": "http", "path": "/v1/jobs", "headers": []}, receive, send))
    assert sent[0]["status"] == 413 and b"limit of 1 MB" in sent[1]["body"]


# ---- bearer token and rate limit ---------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/maisi/info", "/v1/license", "/v1/jobs"])
def test_token_is_needed_except_for_health(nim_server, path):
    assert nim_server.get("/v1/health/live", token="").status == 200
    assert nim_server.get("/v1/health/ready", token="").status == 200
    for token in ("", "wrong"):
        reply = nim_server.get(path, token=token)
        assert reply.status == 401 and "Bearer" in reply.headers["www-authenticate"], reply.body
        assert "Authorization: Bearer" in reply.detail
    assert nim_server.post("/v1/plan", NIM_EXAMPLES[0][0], token="").status == 401
    assert nim_server.get(path).status == 200


def test_rate_limit(model, tmp_path, one_thread):
    with ThreadServer(replace(options(model, tmp_path), rate_limit=3)) as client:
        assert [client.get("/v1/license").status for _ in range(4)] == [200, 200, 200, 429]
        reply = client.get("/v1/jobs")
        assert reply.status == 429 and int(reply.headers["retry-after"]) > 0 and "at most 3 per minute" in reply.detail
        assert client.get("/v1/health/ready").status == 200  # probes are never limited
