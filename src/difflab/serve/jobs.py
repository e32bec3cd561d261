"""The job queue of ``difflab serve``: one sampling job at a time per model (the CPU is shared), the others
waiting in the order they came, each told how many jobs are ahead of it.

A job is a function run on the model's worker thread; it reports progress through :meth:`Job.update`
and calls :meth:`Job.check_cancelled` (from draw_samples' per-step callback), which raises
:class:`JobCancelled` once :meth:`JobQueue.cancel` was called: a cancelled job stops at its next step. Waiting
jobs are simply taken out of the queue. Listeners (the event streams of the web app, on an asyncio loop)
are woken through ``loop.call_soon_threadsafe`` whenever a job changes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Job", "JobQueue", "JobCancelled", "QueueFull", "TERMINAL"]

log = logging.getLogger("difflab.serve")
TERMINAL = ("done", "failed", "cancelled")


class JobCancelled(Exception):
    """Raised inside a running job (at its next sampling step) once it was cancelled."""


class QueueFull(Exception):
    """The model's queue holds its limit of waiting jobs."""


class Job:
    """One sampling request: its state, place in the queue, progress, last x0^ preview and result."""

    def __init__(self, seq: int, model: str, work: Callable[[Job], dict]) -> None:
        self.id = secrets.token_hex(8)
        self.seq = seq
        self.model = model
        self.work: Callable[[Job], dict] | None = work
        self.state = "queued"
        self.ahead = 0  # jobs of the same model that run before this one
        self.progress: dict[str, Any] | None = None
        self.preview: str | None = None  # a data: URL of the latest x0^ grid
        self.preview_version = 0
        self.result: dict | None = None
        self.error: str | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self._cancel = threading.Event()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled

    def update(self, **fields: Any) -> None:
        """Set fields (``progress``, ``preview``, ...) and wake every listener."""
        with self._lock:
            for key, value in fields.items():
                setattr(self, key, value)
            if "preview" in fields:
                self.preview_version += 1
        self._notify()

    def subscribe(self) -> asyncio.Event:
        """An event of the running asyncio loop, set whenever the job changes."""
        event = asyncio.Event()
        with self._lock:
            self._listeners.append((asyncio.get_running_loop(), event))
        return event

    def unsubscribe(self, event: asyncio.Event) -> None:
        with self._lock:
            self._listeners = [(lp, ev) for lp, ev in self._listeners if ev is not event]

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for loop, event in listeners:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: its stream is gone
                pass

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"state": self.state, "ahead": self.ahead, "progress": self.progress,
                    "preview_version": self.preview_version, "preview": self.preview, "result": self.result,
                    "error": self.error}


class JobQueue:
    """Per-model FIFO queues, each drained by its own worker thread (started on demand, ended when idle)."""

    def __init__(self, max_queue: int = 64) -> None:
        self.max_queue = max_queue
        self.jobs: dict[str, Job] = {}
        self._waiting: dict[str, deque[Job]] = {}
        self._running: dict[str, Job] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.finished = {"done": 0, "failed": 0, "cancelled": 0}

    def submit(self, model: str, work: Callable[[Job], dict]) -> Job:
        with self._lock:
            waiting = self._waiting.setdefault(model, deque())
            if len(waiting) >= self.max_queue:
                raise QueueFull(f"the queue of model {model!r} is full ({self.max_queue} jobs waiting); try again "
                                "when some have finished")
            job = Job(next(self._seq), model, work)
            job.ahead = len(waiting) + (model in self._running)
            waiting.append(job)
            self.jobs[job.id] = job
            if model not in self._workers:
                worker = threading.Thread(target=self._drain, args=(model,), name=f"difflab-serve-{model}",
                                          daemon=True)
                self._workers[model] = worker
                worker.start()
        return job

    def cancel(self, job: Job) -> bool:
        """Cancel a waiting job now, a running one at its next step; False if it had already finished."""
        with self._lock:
            if job.state in TERMINAL:
                return False
            job._cancel.set()
            waiting = self._waiting.get(job.model)
            if job.state == "queued" and waiting is not None and job in waiting:
                waiting.remove(job)
                self._finish(job, "cancelled")
                self._renumber(job.model)
                return True
        return True

    def forget(self, job: Job) -> None:
        """Drop a job that nobody follows any more (its stream ended): nothing of it stays in memory."""
        with self._lock:
            self.jobs.pop(job.id, None)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"running": {m: j.id for m, j in self._running.items()},
                    "waiting": {m: len(q) for m, q in self._waiting.items() if q},
                    "jobs": len(self.jobs), "finished": dict(self.finished),
                    "workers": len(self._workers)}

    def _renumber(self, model: str) -> None:
        running = model in self._running
        for k, waiting in enumerate(self._waiting.get(model, ())):
            if waiting.ahead != k + running:
                waiting.ahead = k + running
                waiting._notify()

    def _finish(self, job: Job, state: str, **fields: Any) -> None:
        job.work = None  # the closure holds the request's tensors (uploads, ...)
        job.finished = time.time()
        self.finished[state] += 1
        job.update(state=state, **fields)

    def _drain(self, model: str) -> None:
        while True:
            with self._lock:
                waiting = self._waiting[model]
                if not waiting:
                    del self._workers[model]
                    return
                job = waiting.popleft()
                self._running[model] = job
                job.started = time.time()
                job.state = "running"
                job.ahead = 0
                self._renumber(model)
            job._notify()
            fields: dict[str, Any]
            try:
                job.check_cancelled()
                result = job.work(job)
                state, fields = "done", {"result": result}
            except JobCancelled:
                state, fields = "cancelled", {}
            except (ValueError, OSError, KeyError) as e:
                text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
                state, fields = "failed", {"error": " ".join(text.split()) or type(e).__name__}
            except Exception as e:  # noqa: BLE001 - a bug in one job must not take the server down
                log.exception("job %s of model %s failed", job.id, model)
                state, fields = "failed", {"error": f"internal error: {type(e).__name__}: {e}"}
            with self._lock:
                self._running.pop(model, None)
                self._finish(job, state, **fields)
                self._renumber(model)
