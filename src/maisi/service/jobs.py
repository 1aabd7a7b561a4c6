"""The job queue, persisted in SQLite: submit (bounded), claim, progress, cancel and restart recovery."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
FINAL = (DONE, FAILED, CANCELLED)
# The message of a job whose samples and zip were made but whose delivery (local_working_dir, pre_signed_url)
# failed: it is failed, with the reason in `error`, and its result stays downloadable.
NOT_DELIVERED = "generated, but not delivered (see error); the result zip stays downloadable"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    request TEXT NOT NULL,          -- the GenerationRequest as JSON (nim.request_to_json)
    precision TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,  -- 0..1
    samples_done TEXT NOT NULL DEFAULT '[]',  -- indices of the samples written (skipped on resume)
    message TEXT NOT NULL DEFAULT '',
    error TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker TEXT
)
"""


class QueueFullError(RuntimeError):
    """The queue holds `queue_size` jobs that are queued or running (answered 503)."""


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    created: float
    started: float | None
    finished: float | None
    request: dict[str, Any]
    precision: str
    progress: float
    samples_done: tuple[int, ...]
    message: str
    error: str | None
    restarts: int
    cancel_requested: bool
    worker: str | None

    def public(self) -> dict[str, Any]:
        """What `GET /v1/jobs/{id}` answers."""
        return {"id": self.id, "state": self.state, "progress": round(self.progress, 4),
                "samples_done": len(self.samples_done), "num_samples": self.request.get("num_samples"),
                "message": self.message, "error": self.error, "restarts": self.restarts,
                "cancel_requested": self.cancel_requested, "created": self.created, "started": self.started,
                "finished": self.finished, "precision": self.precision, "request": self.request,
                "result": f"/v1/jobs/{self.id}/result" if self.has_result else None}

    @property
    def has_result(self) -> bool:
        """Done, or failed only in its delivery: the result zip is there."""
        return self.state == DONE or (self.state == FAILED and self.message == NOT_DELIVERED)


def _job(row: sqlite3.Row) -> Job:
    d = dict(row)
    return Job(**{**d, "request": json.loads(d["request"]), "samples_done": tuple(json.loads(d["samples_done"])),
                  "cancel_requested": bool(d["cancel_requested"])})


class JobStore:
    """Every job's state in one SQLite file; safe to share between the request threads and the workers.

    `changed` is notified on every submission, cancel and state change, so workers and waiters wake up."""

    def __init__(self, path: str | Path, queue_size: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.queue_size = queue_size
        self.changed = threading.Condition()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an accepted job survives a power cut
        self._db.execute(SCHEMA)

    def close(self) -> None:
        with self.changed:
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self.changed:
            n = self._db.execute(sql, args).rowcount
            self.changed.notify_all()
            return n

    def get(self, job_id: str) -> Job | None:
        with self.changed:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, limit: int = 100) -> list[Job]:
        with self.changed:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self.changed:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s: n for s, n in rows}

    # ---- the queue ------------------------------------------------------------------------------

    def submit(self, request: dict[str, Any], precision: str, job_id: str | None = None) -> Job:
        """A new queued job; QueueFullError when `queue_size` jobs are already queued or running."""
        job_id = job_id or new_id()
        with self.changed:
            self._db.execute("BEGIN IMMEDIATE")  # the count and the insert as one step
            try:
                active = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", ACTIVE).fetchone()[0]
                if active >= self.queue_size:
                    raise QueueFullError(f"the queue is full ({active} jobs queued or running, at most "
                                         f"{self.queue_size}); retry later")
                self._db.execute("INSERT INTO jobs (id, state, created, request, precision, message) "
                                 "VALUES (?, ?, ?, ?, ?, ?)",
                                 (job_id, QUEUED, time.time(), json.dumps(request), precision, "queued"))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self.changed.notify_all()
        return self.get(job_id)

    def claim(self, worker: str) -> Job | None:
        """The oldest queued job, now running on `worker`; None when nothing is queued."""
        with self.changed:
            row = self._db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY created LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET state = ?, worker = ?, started = COALESCE(started, ?), message = ? "
                             "WHERE id = ?", (RUNNING, worker, time.time(), "running", row[0]))
            return self.get(row[0])

    def progress(self, job_id: str, progress: float, message: str, samples_done: list[int] | None = None) -> None:
        if samples_done is None:
            self._write("UPDATE jobs SET progress = ?, message = ? WHERE id = ? AND state = ?",
                        (progress, message, job_id, RUNNING))
        else:
            self._write("UPDATE jobs SET progress = ?, message = ?, samples_done = ? WHERE id = ? AND state = ?",
                        (progress, message, json.dumps(sorted(samples_done)), job_id, RUNNING))

    def finish(self, job_id: str, state: str, message: str, error: str | None = None) -> None:
        """A running job ends: done, failed or cancelled."""
        self._write("UPDATE jobs SET state = ?, message = ?, error = ?, finished = ?, "
                    "progress = CASE WHEN ? = 'done' THEN 1 ELSE progress END WHERE id = ?",
                    (state, message, error, time.time(), state, job_id))

    def requeue(self, job_id: str, message: str) -> None:
        """A running job goes back to the queue (the server stops); its written samples are kept."""
        self._write("UPDATE jobs SET state = ?, message = ?, worker = NULL WHERE id = ? AND state = ?",
                    (QUEUED, message, job_id, RUNNING))

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once; a running one is asked to stop (its worker cancels it)."""
        with self.changed:
            self._db.execute("UPDATE jobs SET state = ?, message = ?, finished = ? WHERE id = ? AND state = ?",
                             (CANCELLED, "cancelled before it started", time.time(), job_id, QUEUED))
            self._db.execute("UPDATE jobs SET cancel_requested = 1, message = ? WHERE id = ? AND state = ?",
                             ("cancelling", job_id, RUNNING))
            self.changed.notify_all()
        return self.get(job_id)

    def recover(self, max_restarts: int) -> list[Job]:
        """At start-up, jobs left running by a server that stopped without requeueing them (a crash, a kill):
        requeued to resume, unless cancelled meanwhile or interrupted more than `max_restarts` times."""
        with self.changed:
            rows = self._db.execute("SELECT * FROM jobs WHERE state = ?", (RUNNING,)).fetchall()
        now = time.time()
        for job in map(_job, rows):
            n = job.restarts + 1
            if job.cancel_requested:
                self.finish(job.id, CANCELLED, "cancelled (the server stopped while cancelling it)")
            elif n > max_restarts:
                self._write("UPDATE jobs SET state = ?, restarts = ?, finished = ?, message = ?, error = ? "
                            "WHERE id = ?", (FAILED, n, now, "failed", f"interrupted by {n} server restarts "
                                             f"(at most {max_restarts} are resumed); submit it again", job.id))
            else:
                self._write("UPDATE jobs SET state = ?, restarts = ?, worker = NULL, message = ? WHERE id = ?",
                            (QUEUED, n, f"resuming after a server restart ({len(job.samples_done)} of "
                                        f"{job.request.get('num_samples')} samples kept)", job.id))
        return [self.get(r["id"]) for r in rows]

    def wait(self, timeout: float) -> None:
        """Sleep until something changes or `timeout` seconds pass."""
        with self.changed:
            self.changed.wait(timeout)


def new_id() -> str:
    return uuid.uuid4().hex
