"""The FastAPI app of `maisi serve`: the NIM's routes, the job routes, the web page, and the checks before any
compute."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile

from maisi import __version__, labels
from maisi.data.preview import label_colours
from maisi.io.formats import IMAGE_EXTS, LABEL_EXTS
from maisi.networks.precision import compute_dtype
from maisi.pipeline.pipeline import Pipeline
from maisi.pipeline.validation import GenerationRequest, Plan, check_files, rules_for
from maisi.service.config import ServeOptions
from maisi.service.guard import Guard
from maisi.service.jobs import DONE, FINAL, JobStore, QueueFullError, new_id
from maisi.service.nim import (
    NIM_REGIONS,
    NIM_SPACING,
    NIM_XY_SIZES,
    NIM_Z_RANGE,
    NotSupportedError,
    RunPayload,
    parse_payload,
    request_to_json,
    to_request,
)
from maisi.service.outputs import ForbiddenError, check_delivery, save_delivery
from maisi.service.workers import Worker, default_devices, result_path

MASK_EXTS = (".nii.gz", ".nii", ".nrrd")  # uploaded masks (a DICOM folder cannot travel as one file)
LICENSE = ("maisi is released under the Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0). "
           "NVIDIA's MAISI weights, when served, come under NVIDIA's own license (see the model card); "
           "generated images are synthetic and not for diagnosis.")
POLL_S = 0.2
JOBS_LIMIT = 1000  # the most jobs one GET /v1/jobs lists (?limit=1..JOBS_LIMIT; default 100)
FORM_PARTS = ("payload", "mask")  # the parts of a multipart submission, each at most once
WEB = Path(__file__).parent / "web"  # the page (index.html, app.js, style.css) and vendor/niivue.umd.js
# What the files route serves, by how a result file's name ends (a DICOM series is a folder: the zip has it).
FILE_TYPES = {".nii.gz": "application/gzip", ".nii": "application/octet-stream", ".nrrd": "application/octet-stream",
              ".json": "application/json", ".png": "image/png"}


@dataclass
class Service:
    """What the routes share: the options, the job store and the workers."""

    options: ServeOptions
    store: JobStore
    workers: list[Worker]

    @property
    def pipe(self):
        """The networks of the first worker that loaded them (planning reads only the config and defaults)."""
        for w in self.workers:
            pipes = w.pipes  # a worker swaps in a new dict when it reloads: read it once
            if w.ready.is_set() and pipes:
                return next(iter(pipes.values()))
        errors = [w.load_error for w in self.workers if w.load_error]
        raise HTTPException(503, f"the model failed to load: {errors[0]}" if errors else "the model is still "
                            "loading; retry when GET /v1/health/ready answers 200", headers={"Retry-After": "5"})

    def nim_limits(self) -> bool:
        mode = self.options.nim_limits
        return mode == "on" or (mode == "auto" and rules_for(self.pipe.config).xy_sizes is not None)


def create_app(options: ServeOptions, lock: IO | None = None) -> FastAPI:
    """The app; its lifespan opens the job store, recovers interrupted jobs and starts one worker per device.
    `lock`: the work dir's lock when the caller took it already (`maisi serve` does, before it listens); else the
    lifespan takes it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        held = lock or lock_work_dir(options.work_dir)
        store = JobStore(options.database, options.queue_size)
        store.recover(options.max_restarts)
        workers = [Worker(options, store, d) for d in options.devices or default_devices()]
        for w in workers:
            w.start()
        app.state.service = Service(options, store, workers)
        try:
            yield
        finally:
            for w in workers:
                w.stop()
            for w in workers:  # a running job is requeued at its next sampling step
                await run_in_threadpool(w.join, 30)
            store.close()
            held.close()

    app = FastAPI(title="maisi serve", version=__version__, lifespan=lifespan,
                  description="MAISI CT generation, compatible with NVIDIA's MAISI NIM, plus a job queue.")
    app.add_middleware(Guard, options=options)
    _routes(app)
    _web_routes(app)
    return app


def lock_work_dir(work_dir: Path) -> IO:
    """An exclusive lock on the work dir for the server's lifetime (the kernel drops it if the process dies): a
    second server on the same jobs would resume the first one's running jobs. The folder is created when missing;
    ValueError when it cannot be, or when another server holds it (which then leaves that server's files as
    they were)."""
    if work_dir.exists() and not work_dir.is_dir():
        raise ValueError(f"work_dir {work_dir} is a file, not a folder; give a folder (created when missing)")
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        f = open(work_dir / "server.lock", "a")  # "a": a lock held by another server is not emptied
    except OSError as e:
        raise ValueError(f"work_dir {work_dir}: cannot create it or its server.lock ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"work_dir {work_dir} is in use by another maisi serve; give each server its own work "
                         "folder") from None
    return f


def service(request: Request) -> Service:
    return request.app.state.service


def _routes(app: FastAPI) -> None:
    @app.get("/v1/health/live")
    def live() -> dict:
        return {"status": "live"}

    @app.get("/v1/health/ready")
    def ready(request: Request):
        workers = service(request).workers
        errors = [w.load_error for w in workers if w.load_error]
        if errors:
            return JSONResponse({"status": "failed", "detail": errors[0]}, 503)
        if not all(w.ready.is_set() for w in workers):
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ready"}

    @app.get("/v1/license")
    def license_() -> dict:
        return {"name": "Apache-2.0", "text": LICENSE}

    @app.get("/v1/maisi/info")
    def info(request: Request) -> dict:
        svc = service(request)
        pipe = svc.pipe
        return {"version": __version__, "model": {"config": pipe.config.name, "weights": pipe.nets.sources,
                                                  "defaults": pipe.nets.defaults, "controlnet": pipe.nets.controlnet is not None},
                "labels": labels.name_to_id(), "body_regions": list(NIM_REGIONS), "image_output_ext": list(IMAGE_EXTS),
                "label_output_ext": list(LABEL_EXTS), "nim_limits": {
                    "output_size_xy": list(NIM_XY_SIZES), "output_size_z": list(NIM_Z_RANGE),
                    "spacing": list(NIM_SPACING)} if svc.nim_limits() else None,
                "fields": list(RunPayload.model_fields), "max_samples": svc.options.max_samples,
                "devices": [w.device for w in svc.workers], "queue": svc.store.counts(),
                "queue_size": svc.options.queue_size, "mask_upload": list(MASK_EXTS)}

    @app.post("/v1/plan")
    async def plan(request: Request) -> dict:
        """Every check of a submission and the resolved grid, without queueing anything."""
        job_id, req, plan, _ = await _prepare(request, keep=False)
        return {"size": list(plan.size), "spacing": list(plan.spacing), "body_region": list(req.body_region),
                "steps": plan.steps, "use_mask": plan.use_mask, "warnings": list(plan.warnings)}

    @app.post("/v1/jobs", status_code=202)
    async def submit(request: Request) -> JSONResponse:
        svc = service(request)
        job_id, req, plan, precision = await _prepare(request)
        job = await run_in_threadpool(_enqueue, svc, job_id, req, precision)
        body = {**job.public(), "warnings": list(plan.warnings)}
        return JSONResponse(body, 202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs")
    def jobs(request: Request, limit: str = "100") -> dict:
        """The newest `limit` jobs (the raw text here: a bad limit gets the service's 400, not FastAPI's 422)."""
        return {"jobs": [j.public() for j in service(request).store.list(parse_limit(limit))]}

    @app.get("/v1/jobs/{job_id}")
    def job(request: Request, job_id: str) -> dict:
        return _job(service(request), job_id).public()

    @app.get("/v1/jobs/{job_id}/result")
    def result(request: Request, job_id: str):
        svc = service(request)
        j = _job(svc, job_id)
        if not j.has_result:
            raise HTTPException(409, f"job {job_id} is {j.state}, not done" + (f": {j.error}" if j.error else ""))
        return FileResponse(result_path(svc.options, job_id), media_type="application/zip",
                            filename=f"maisi_{job_id}.zip")

    @app.delete("/v1/jobs/{job_id}", status_code=202)
    def cancel(request: Request, job_id: str) -> dict:
        svc = service(request)
        j = _job(svc, job_id)
        if j.state in FINAL:
            raise HTTPException(409, f"job {job_id} is already {j.state}; nothing to cancel")
        return svc.store.cancel(job_id).public()

    @app.post("/v1/maisi/run")
    async def run(request: Request):
        """The NIM's synchronous route: queue the job, wait for it, answer the zip of image-label pairs."""
        svc = service(request)
        job_id, req, _, precision = await _prepare(request)
        await run_in_threadpool(_enqueue, svc, job_id, req, precision)
        while True:
            j = svc.store.get(job_id)
            if j.state in FINAL:
                break
            if await request.is_disconnected():  # nobody waits for it any more
                svc.store.cancel(job_id)
                return JSONResponse({"detail": "client disconnected"}, 499)
            await asyncio.sleep(POLL_S)
        if j.state != DONE:
            status = 500 if j.state == "failed" else 409
            return JSONResponse({"detail": f"job {job_id} {j.state}: {j.error or j.message}", "job": j.public()}, status)
        return FileResponse(result_path(svc.options, job_id), media_type="application/zip",
                            filename=f"maisi_{job_id}.zip", headers={"X-Maisi-Job": job_id})


def _web_routes(app: FastAPI) -> None:
    """The page (public: it asks for the token), the legend, and one result file at a time for its viewer."""
    app.mount("/web", StaticFiles(directory=WEB), name="web")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/v1/maisi/legend")
    def legend() -> dict:
        """Every label's id, name and overlay colour (the colours of the PNG previews)."""
        colours = label_colours()
        return {"labels": [{"id": i, "name": name, "rgb": colours[i].tolist()}
                           for i, name in sorted(labels.id_to_name().items()) if 0 < i < len(colours)]}

    @app.get("/v1/jobs/{job_id}/files")
    def files(request: Request, job_id: str) -> dict:
        """The job's output files written so far (a DICOM series is a folder, listed but served only in the zip)."""
        out = _out_dir(service(request), job_id)
        found = sorted(out.iterdir()) if out.is_dir() else []
        return {"files": [{"name": f.name, "size": f.stat().st_size if f.is_file() else None, "folder": f.is_dir()}
                          for f in found if not f.name.startswith(".")]}

    @app.get("/v1/jobs/{job_id}/files/{name}")
    def file(request: Request, job_id: str, name: str) -> FileResponse:
        out = _out_dir(service(request), job_id)
        path = out / name
        kind = next((t for ext, t in FILE_TYPES.items() if name.endswith(ext)), None)
        # a plain name of a file in the job's output folder: no separators, no "..", no hidden file, no link out of it
        if name != Path(name).name or name.startswith(".") or kind is None or path.resolve().parent != out.resolve() \
                or not path.is_file():
            raise HTTPException(404, f"job {job_id} has no file {name!r}; GET /v1/jobs/{job_id}/files lists them")
        return FileResponse(path, media_type=kind, filename=name, content_disposition_type="inline")


def parse_limit(text: str) -> int:
    """The `limit` query parameter of GET /v1/jobs: an integer in 1..JOBS_LIMIT, else 400 saying so."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= JOBS_LIMIT:
        raise HTTPException(400, f"limit must be an integer in 1..{JOBS_LIMIT}, got {text[:40]!r}")
    return value


def _out_dir(svc: Service, job_id: str) -> Path:
    _job(svc, job_id)  # 404 for an unknown id, before the id touches a path
    return svc.options.job_dir(job_id) / "out"


def _job(svc: Service, job_id: str):
    j = svc.store.get(job_id)
    if j is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return j


def _enqueue(svc: Service, job_id: str, req: GenerationRequest, precision: str):
    try:
        return svc.store.submit(request_to_json(req), precision, job_id)
    except QueueFullError as e:
        shutil.rmtree(svc.options.job_dir(job_id), ignore_errors=True)
        raise HTTPException(503, str(e), headers={"Retry-After": "10"}) from None


async def _prepare(request: Request, keep: bool = True) -> tuple[str, GenerationRequest, Any, str]:
    """Read a submission (JSON, or multipart with `payload` and a `mask` file), then every check the library
    makes before compute: a bad request is a 4xx with the library's message and leaves nothing behind."""
    svc = service(request)
    job_id = new_id()
    folder = svc.options.job_dir(job_id)
    try:
        kind = request.headers.get("content-type", "")
        mask = None
        if kind.startswith("multipart/form-data"):
            form = await request.form(max_files=2, max_fields=8)
            for name in form.keys():
                if name not in FORM_PARTS:
                    raise ValueError(f"multipart part {name!r} is not one this route reads; send 'payload' (the "
                                     "JSON payload) and, optionally, one 'mask' file")
                if len(form.getlist(name)) > 1:
                    raise ValueError(f"multipart part {name!r} is sent {len(form.getlist(name))} times; send it once")
            raw, mask = form.get("payload"), form.get("mask")
            if not isinstance(raw, str):
                raise ValueError("a multipart submission needs a 'payload' field holding the JSON payload")
            if mask is not None and not isinstance(mask, UploadFile):
                raise ValueError("the 'mask' field must be a file (NIfTI or NRRD label map)")
        else:
            raw = await request.body()
        payload = parse_payload(raw)
        return await run_in_threadpool(_check, svc, job_id, payload, mask, folder, keep)
    except HTTPException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        # the library names files by path: say "uploaded mask.nii.gz", not where the server keeps it
        message = str(e).replace(f"{folder / 'inputs'}/", "uploaded ").replace(str(folder), "the job folder")
        if message.startswith("anatomy_size"):  # the library's name for the NIM's field
            message = "controllable_" + message
        status = 422 if isinstance(e, NotSupportedError) else 403 if isinstance(e, ForbiddenError) else 400
        raise HTTPException(status, message) from None
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def _check(svc: Service, job_id: str, payload: RunPayload, mask: UploadFile | None, folder: Path, keep: bool):
    pipe = svc.pipe
    mask_path = mapping_path = None
    if mask is not None:
        name = (mask.filename or "").lower()
        ext = next((e for e in MASK_EXTS if name.endswith(e)), None)
        if ext is None:
            raise ValueError(f"mask file {mask.filename!r}: upload a label map ending in {', '.join(MASK_EXTS)}")
        mask_path = folder / "inputs" / f"mask{ext}"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        with open(mask_path, "wb") as f:
            shutil.copyfileobj(mask.file, f)
        if payload.mask_mapping is not None:
            mapping_path = folder / "inputs" / "mask_mapping.json"
            mapping_path.write_text(json.dumps(payload.mask_mapping))
    req = to_request(payload, max_samples=svc.options.max_samples, nim_limits=svc.nim_limits(),
                     mask=None if mask_path is None else str(mask_path),
                     mask_mapping=None if mapping_path is None else str(mapping_path))
    delivery = check_delivery(payload.pre_signed_url, payload.local_working_dir, svc.options.local_dirs)
    if keep:
        save_delivery(folder, delivery)
    precision = payload.precision or svc.options.precision
    for w in svc.workers:
        compute_dtype(precision, torch.device(w.device))
    check_files(req, folder / "out")
    plan = pipe.plan(req)
    check_decode(pipe, plan, precision)  # the plan has checked the mask database (Pipeline.plan)
    return job_id, req, plan, precision


def check_decode(pipe: Pipeline, plan: Plan, precision: str) -> None:
    """That one sample decodes within `memory_gb` (or the device's memory): `Pipeline.decode_plan` in the
    job's precision (the loaded networks may be in another), made before the job is queued, not after sampling."""
    pipe.decode_plan(plan, compute_dtype(precision, pipe.device))

