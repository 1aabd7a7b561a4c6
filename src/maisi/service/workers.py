"""One worker thread per device: claim a job, generate its samples one by one, zip them; stop, cancel, resume."""

from __future__ import annotations

import threading
import traceback
import zipfile
from pathlib import Path

import torch

from maisi.io.atomic import atomic_path
from maisi.pipeline.pipeline import Pipeline
from maisi.service.config import ServeOptions
from maisi.service.jobs import CANCELLED, DONE, FAILED, NOT_DELIVERED, Job, JobStore
from maisi.service.nim import request_from_json
from maisi.service.outputs import DeliveryError, deliver

RESULT = "result.zip"


class Interrupted(Exception):
    """Raised between sampling steps when the job is cancelled or the server stops."""


def default_devices() -> tuple[str, ...]:
    n = torch.cuda.device_count()
    return tuple(f"cuda:{i}" for i in range(n)) or ("cpu",)


def result_path(options: ServeOptions, job_id: str) -> Path:
    return options.job_dir(job_id) / RESULT


def zip_folder(folder: Path, target: Path) -> Path:
    """Every file under `folder` (a DICOM series folder included) in one zip, written atomically."""
    with atomic_path(target, ".zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                z.write(f, f.relative_to(folder).as_posix())
    return target


class Worker(threading.Thread):
    """Loads the networks on its device, then runs queued jobs until `stop` is set."""

    def __init__(self, options: ServeOptions, store: JobStore, device: str) -> None:
        super().__init__(name=f"maisi-worker-{device}", daemon=True)
        self.options, self.store, self.device = options, store, device
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.pipes: dict[str, Pipeline] = {}

    def pipeline(self, precision: str) -> Pipeline:
        """The networks in `precision`, loaded once; one precision is kept at a time (memory)."""
        if precision not in self.pipes:
            self.pipes = {}  # a new dict, not a cleared one: the request threads may be reading the old one
            pipe = Pipeline.from_pretrained(self.options.weights, self.options.config, self.device,
                                                   progress=False, precision=precision)
            self.pipes = {precision: pipe}
        return self.pipes[precision]

    def run(self) -> None:
        try:
            self.pipeline(self.options.precision)
        except Exception as e:  # the server stays up and says why it is not ready
            self.load_error = f"{type(e).__name__}: {e}"
            return
        finally:
            self.ready.set()
        while not self.stopping.is_set():
            job = self.store.claim(self.name)
            if job is None:
                self.store.wait(0.5)
                continue
            self.run_job(job)

    def stop(self) -> None:
        self.stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()

    # ---- one job ---------------------------------------------------------------------------------

    def run_job(self, job: Job) -> None:
        try:
            self._generate(job)
        except Interrupted:
            if self.stopping.is_set() and not self._cancel_requested(job.id):
                self.store.requeue(job.id, "interrupted by a server stop; resumes at the next start")
            else:
                self.store.finish(job.id, CANCELLED, "cancelled while running")
        except Exception as e:  # the job fails with the reason; the worker goes on
            self.store.finish(job.id, FAILED, "failed", f"{type(e).__name__}: {e}")
            traceback.clear_frames(e.__traceback__)

    def _cancel_requested(self, job_id: str) -> bool:
        current = self.store.get(job_id)
        return current is None or current.cancel_requested

    def _generate(self, job: Job) -> None:
        request = request_from_json(job.request)
        n = request.num_samples
        pipe = self.pipeline(job.precision)
        out = self.options.job_dir(job.id) / "out"
        done = set(job.samples_done)  # written before a restart: same seed, same sample, so kept

        def check(progress: float, message: str, samples: list[int] | None = None) -> None:
            if self.stopping.is_set() or self._cancel_requested(job.id):
                raise Interrupted
            self.store.progress(job.id, progress, message, samples)

        plan = pipe.plan(request)
        for k in range(n):
            if k in done:
                continue
            pipe.on_step = lambda i, total, k=k: check((len(done) + i / total) / n,
                                                      f"sample {k + 1}/{n}: step {i}/{total}")
            check(len(done) / n, f"sample {k + 1}/{n}")
            pipe.generate(request, out=out, rank=k, world_size=n, plan=plan)  # exactly sample k (seed + k)
            done.add(k)
            self.store.progress(job.id, len(done) / n, f"{len(done)}/{n} samples written", sorted(done))
        zip_folder(out, result_path(self.options, job.id))
        try:  # local_working_dir and pre_signed_url, when the request named them
            delivered = deliver(self.options.job_dir(job.id), out, result_path(self.options, job.id),
                                self.options.local_dirs)
        except DeliveryError as e:
            self.store.finish(job.id, FAILED, NOT_DELIVERED, str(e))
            return
        self.store.finish(job.id, DONE, "; ".join([f"{n} sample(s) generated", *delivered]))
