"""The job queue of `maisi serve` on 127.0.0.1: lifecycle, cancel, queue full, restarts (a stop, a kill) that lose
no job, restart recovery rules, and a bounded load test."""

from __future__ import annotations

import io
import resource
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from maisi.service.app import lock_work_dir
from maisi.service.jobs import CANCELLED, FAILED, QUEUED, RUNNING, JobStore, QueueFullError
from pipeline_support import save_tiny_model
from service_support import SMALL, ProcessServer, ThreadServer, options, zip_names

FINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))[0]


def samples(n: int, **change) -> dict:
    return {**SMALL, "num_output_samples": n, **change}


def images(body: bytes) -> list[str]:
    return [n for n in zip_names(body) if "_image." in n]


def test_job_lifecycle(model, tmp_path, one_thread):
    with ThreadServer(options(model, tmp_path)) as client:
        reply = client.post("/v1/jobs", samples(3))
        assert reply.status == 202 and reply.headers["location"] == f"/v1/jobs/{reply.json()['id']}"
        job_id, seen = reply.json()["id"], []
        job = client.wait_job(job_id, lambda j: seen.append(j["progress"]) or j["state"] in FINAL)
        assert job["state"] == "done" and job["samples_done"] == 3 and job["result"] == f"/v1/jobs/{job_id}/result"
        assert seen == sorted(seen) and seen[-1] == 1.0  # progress only goes up
        assert images(client.get(job["result"]).body) == [f"sample_seed{s}_image.nii.gz" for s in range(3)]
        assert client.call("DELETE", f"/v1/jobs/{job_id}").status == 409  # nothing left to cancel
        assert client.get("/v1/jobs/nope").status == 404 and "no job 'nope'" in client.get("/v1/jobs/nope").detail
        assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [job_id]


def test_cancel_running_and_queued_jobs(model, tmp_path, one_thread):
    with ThreadServer(options(model, tmp_path, max_samples=20)) as client:
        running = client.post("/v1/jobs", samples(20)).json()["id"]
        queued = client.post("/v1/jobs", samples(1)).json()["id"]
        client.wait_job(running, lambda j: j["progress"] > 0)
        reply = client.call("DELETE", f"/v1/jobs/{queued}")
        assert reply.status == 202 and reply.json()["state"] == CANCELLED  # at once: it never started
        reply = client.call("DELETE", f"/v1/jobs/{running}")
        assert reply.status == 202 and reply.json()["cancel_requested"]
        job = client.wait_job(running, timeout=30)
        assert job["state"] == CANCELLED and job["samples_done"] < 20, job
        result = client.get(f"/v1/jobs/{running}/result")
        assert result.status == 409 and "is cancelled, not done" in result.detail
        assert client.post("/v1/jobs", samples(1)).status == 202  # the worker goes on


def test_queue_full_is_503(model, tmp_path, one_thread):
    with ThreadServer(options(model, tmp_path, queue_size=2, max_samples=20)) as client:
        ids = [client.post("/v1/jobs", samples(20)).json()["id"] for _ in range(2)]
        for route in ("/v1/jobs", "/v1/maisi/run"):
            reply = client.post(route, samples(1))
            assert reply.status == 503 and "queue is full" in reply.detail and reply.headers["retry-after"]
        assert len(client.get("/v1/jobs").json()["jobs"]) == 2  # the refused ones left nothing
        for job_id in ids:
            client.call("DELETE", f"/v1/jobs/{job_id}")
        client.wait_job(ids[0], timeout=30)
        assert client.post("/v1/jobs", samples(1)).status == 202  # room again


def test_a_stopped_server_resumes_its_job(model, tmp_path, one_thread):
    opts = options(model, tmp_path, max_samples=6)
    with ThreadServer(opts) as client:
        job_id = client.post("/v1/jobs", samples(6)).json()["id"]
        client.wait_job(job_id, lambda j: j["samples_done"] >= 2)
    store = JobStore(opts.database, 1)  # stopped mid-job: requeued, its written samples kept
    job = store.get(job_id)
    store.close()
    assert job.state == QUEUED and "interrupted by a server stop" in job.message and len(job.samples_done) >= 2
    kept = {k: (tmp_path / "jobs" / job_id / "out" / f"sample_seed{k}_image.nii.gz").stat().st_mtime_ns
            for k in job.samples_done}
    with ThreadServer(options(model, tmp_path, max_samples=6)) as client:
        done = client.wait_job(job_id)
        assert done["state"] == "done" and done["samples_done"] == 6, done
        assert len(images(client.get(f"/v1/jobs/{job_id}/result").body)) == 6
    for k, mtime in kept.items():  # resumed, not redone
        assert (tmp_path / "jobs" / job_id / "out" / f"sample_seed{k}_image.nii.gz").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_a_killed_server_loses_no_job(model, tmp_path):
    """SIGKILL in the middle of a job (no shutdown code runs): the next start resumes it from SQLite."""
    with ProcessServer(model, tmp_path, "--max-samples", "8") as server:
        client = server.client
        job_id = client.post("/v1/jobs", samples(8)).json()["id"]
        waiting = client.post("/v1/jobs", samples(1)).json()["id"]
        client.wait_job(job_id, lambda j: j["samples_done"] >= 1)
        server.kill()
    with ProcessServer(model, tmp_path) as server:
        job = server.client.wait_job(job_id)
        assert job["state"] == "done" and job["samples_done"] == 8 and job["restarts"] == 1, job
        assert server.client.wait_job(waiting)["state"] == "done"


def test_recovery_rules(tmp_path):
    """At start-up a job found running was interrupted: resumed, cancelled if asked, failed past max_restarts."""
    store = JobStore(tmp_path / "jobs.sqlite", queue_size=3)
    resumed, cancelled, failed = (store.submit({"num_samples": 2}, "fp32").id for _ in range(3))
    with pytest.raises(QueueFullError, match="queue is full"):
        store.submit({"num_samples": 1}, "fp32")
    for _ in range(3):
        store.claim("w")
    store.cancel(cancelled)
    store._write("UPDATE jobs SET restarts = 2 WHERE id = ?", (failed,))
    store.recover(max_restarts=2)
    assert store.get(resumed).state == QUEUED and store.get(resumed).restarts == 1
    assert store.get(cancelled).state == CANCELLED
    j = store.get(failed)
    assert j.state == FAILED and "interrupted by 3 server restarts (at most 2 are resumed)" in j.error
    assert store.claim("w").id == resumed and store.get(resumed).state == RUNNING
    store.close()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(client, n: int, route: str) -> list:
    """n requests at once from n threads; returns every reply."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda k: client.post(route, samples(1, seed=k), timeout=300), range(n)))


def test_load_concurrent_jobs(model, tmp_path, one_thread):
    """8 submissions at once: every one answered 202, became its own job, and finished."""
    n = 8
    with ThreadServer(options(model, tmp_path, queue_size=64)) as client:
        replies = load(client, n, "/v1/jobs")
        assert [r.status for r in replies] == [202] * n
        ids = {r.json()["id"] for r in replies}
        jobs = [client.wait_job(i) for i in ids]
        assert len(ids) == n and {j["state"] for j in jobs} == {"done"}
        assert {j["request"]["seed"] for j in jobs} == set(range(n))
        assert {j["id"] for j in client.get("/v1/jobs").json()["jobs"]} == ids


@pytest.mark.slow
def test_load_50_concurrent_runs_memory_flat(model, tmp_path, one_thread):
    """50 synchronous NIM runs at once after a warm-up of 10: all answered with their own zip, no job lost, and
    the peak RSS grows by less than 100 MB over the 50 (no per-job growth)."""
    with ThreadServer(options(model, tmp_path, queue_size=64)) as client:
        assert [r.status for r in load(client, 10, "/v1/maisi/run")] == [200] * 10
        before = rss_mb()
        replies = load(client, 50, "/v1/maisi/run")
        assert [r.status for r in replies] == [200] * 50
        assert sorted(images(r.body)[0] for r in replies) == sorted(f"sample_seed{k}_image.nii.gz" for k in range(50))
        assert rss_mb() - before < 100, (before, rss_mb())
        states = [j["state"] for j in client.get("/v1/jobs?limit=200").json()["jobs"]]
        assert states == ["done"] * 60


def test_result_zip_is_a_valid_archive(model, tmp_path, one_thread):
    with ThreadServer(options(model, tmp_path)) as client:
        job_id = client.post("/v1/jobs", samples(1, image_output_ext=".dcm")).json()["id"]
        assert client.wait_job(job_id)["state"] == "done"
        body = client.get(f"/v1/jobs/{job_id}/result").body
        assert zipfile.ZipFile(io.BytesIO(body)).testzip() is None
        assert any(n.startswith("sample_seed0_image.dcm/") for n in zip_names(body))  # a DICOM series folder


def test_one_server_per_work_dir(model, tmp_path, one_thread):
    """A second server on the same jobs would resume the first one's running jobs: it refuses to start."""
    with pytest.raises(ValueError, match="in use by another maisi serve"), lock_work_dir(tmp_path):
        lock_work_dir(tmp_path)
    with ThreadServer(options(model, tmp_path)), pytest.raises(RuntimeError, match="stopped while starting"):
        with ThreadServer(options(model, tmp_path)):
            pass
    lock_work_dir(tmp_path).close()  # free again once the server is gone
