"""One chip, many users: one worker thread owns the pipeline; jobs wait in one bounded FIFO queue.

The worker opens the model (`opener()`, in the background: /health says "loading" until it is
ready), then takes jobs in arrival order. A job is queued (with its place in the queue),
generating (image k of n, step i of N), completed (the PNGs), failed (the error) or cancelled.
Cancelling a queued job takes it out of the queue; a running job stops at its next step
boundary (the pipeline's per-step callback raises). Image k of a request uses seed + k, through
the same pipeline call and PNG writer as `fluxc run`, so its bytes equal `fluxc run --out`'s.
"""
from __future__ import annotations

import base64
import itertools
import threading
import time
import uuid
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from fluxc.errors import FluxcError
from fluxc.runtime.pipeline import png_bytes
from fluxc.serve.request import GenerationRequest

KEEP_FINISHED = 256  # finished jobs kept for polling; older ones are forgotten


class QueueFull(Exception):
    pass


class NotReady(Exception):
    pass


class Cancelled(Exception):
    pass


@dataclass
class Job:
    req: GenerationRequest
    id: str = field(default_factory=lambda: "job-" + uuid.uuid4().hex[:16])
    created: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"  # queued | generating | completed | failed | cancelled
    image: int = 0  # index of the image being generated
    step: int = 0  # steps done of the current image
    total: int = 0  # steps run per image (img2img runs the last `strength` of them); 0 until known
    images: list[dict] = field(default_factory=list)  # {"png": bytes, "seed": int}
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    step_s: list[float] = field(default_factory=list)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def data(self) -> list[dict]:
        """OpenAI's `data` list: one {"b64_json", "seed"} per image."""
        return [{"b64_json": base64.b64encode(im["png"]).decode("ascii"), "seed": im["seed"]} for im in self.images]


class Worker:
    def __init__(self, opener: Callable[[], object], max_queue: int = 8, on_ready=None, on_failed=None):
        self._opener = opener
        self.max_queue = max_queue
        self.on_ready, self.on_failed = on_ready, on_failed
        self.status = "loading"  # loading | ready | failed | stopped
        self.error: str | None = None
        self.model = None  # the opened model (fluxc/serve/model.py ServedModel), owned by the worker thread
        self.last_step_s: float | None = None
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._stopping = False
        self._cv = threading.Condition()
        self._count = itertools.count()
        self.thread = threading.Thread(target=self._main, name="fluxc-serve-worker", daemon=True)

    # ---- called from request handlers (any thread) ----
    def start(self) -> None:
        self.thread.start()

    def submit(self, req: GenerationRequest) -> Job:
        with self._cv:
            if self._stopping:
                raise NotReady("the server is shutting down")
            if self.status != "ready":
                raise NotReady(f"the model is {self.status}" + (f": {self.error}" if self.error else ""))
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); retry later")
            job = Job(req)
            self._queue.append(job)
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP_FINISHED + self.max_queue + 1:
                old = next(iter(self._jobs.values()))
                if not old.done.is_set():
                    break
                self._jobs.popitem(last=False)
            self._cv.notify_all()
            return job

    def get(self, job_id: str) -> Job | None:
        with self._cv:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """1 = next to run; None once it left the queue."""
        with self._cv:
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return None

    def state(self, job: Job) -> dict:
        """The job as the API and the page show it."""
        with self._cv:
            d = {"id": job.id, "object": "image.generation.job", "created": job.created, "status": job.status,
                 "request": job.req.to_dict()}
            if job.status == "queued":
                d["position"] = self._queue.index(job) + 1 if job in self._queue else None
                d["queue_length"] = len(self._queue)
            elif job.status == "generating":
                d["progress"] = {"image": job.image + 1, "images": job.req.n, "step": job.step,
                                 "steps": job.total or job.req.steps}
                if job.cancel_event.is_set():
                    d["cancel_requested"] = True
            elif job.status == "completed":
                d["data"] = job.data()
                d["seconds"] = round(job.seconds, 3)
            else:
                d["error"] = job.error
            if job.notes:
                d["notes"] = list(job.notes)
            return d

    def cancel(self, job: Job, why: str = "cancelled by the client") -> None:
        with self._cv:
            if job.status == "queued" and job in self._queue:
                self._queue.remove(job)
                self._finish(job, "cancelled", why)
            elif job.status == "generating":
                job.error = why
                job.cancel_event.set()

    def busy(self) -> bool:
        """A job is running (shutdown waits for it to stop)."""
        return self._running is not None

    def queue_length(self) -> int:
        with self._cv:
            return len(self._queue)

    def shutdown(self) -> None:
        """Cancel the queued jobs, stop the running one at its next step; the worker then closes the
        model and ends. Safe to call more than once, from any thread."""
        with self._cv:
            self._stopping = True
            while self._queue:
                self._finish(self._queue.popleft(), "cancelled", "the server is shutting down")
            if self._running is not None:
                self._running.error = "the server is shutting down"
                self._running.cancel_event.set()
            self._cv.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)

    # ---- the worker thread ----
    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status = status
        if error is not None:
            job.error = error
        job.done.set()

    def _main(self) -> None:
        try:
            self.model = self._opener()
        except BaseException as e:  # noqa: BLE001 - reported as the server's start error
            self.error = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.status = "failed"
            if self.on_failed:
                self.on_failed(self.error)
            return
        try:
            with self._cv:
                if not self._stopping:
                    self.status = "ready"
            if self.status == "ready" and self.on_ready:
                self.on_ready(self.model)
            while True:
                with self._cv:
                    while not self._queue and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                    job = self._queue.popleft()
                    job.status = "generating"
                    self._running = job
                try:
                    self._run(job)
                finally:
                    with self._cv:
                        self._running = None
        finally:
            self.status = "stopped"
            self.model.close()

    def _run(self, job: Job) -> None:
        r = job.req
        t0 = time.perf_counter()

        def on_step(i: int, n: int) -> None:
            job.step, job.total = i, n
            if job.cancel_event.is_set():
                raise Cancelled()

        try:
            pipe = self.model.pipeline(r.height, r.width)
            for k in range(r.n):
                job.image, job.step = k, 0
                if job.cancel_event.is_set():
                    raise Cancelled()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    res = pipe(r.prompt, None, r.steps, r.guidance, r.seed + k, on_step=on_step,
                               **r.pipeline_kwargs())
                for w in caught:
                    if str(w.message) not in job.notes:
                        job.notes.append(str(w.message))
                job.images.append({"png": png_bytes(res.image), "seed": r.seed + k})
                job.step_s.extend(res.timings.get("step_s") or [])
        except Cancelled:
            with self._cv:
                self._finish(job, "cancelled", job.error or "cancelled")
            return
        except FluxcError as e:
            with self._cv:
                self._finish(job, "failed", str(e).splitlines()[0])
            return
        except Exception as e:  # noqa: BLE001 - one job fails, the server goes on
            with self._cv:
                self._finish(job, "failed", f"{type(e).__name__}: {e}".splitlines()[0])
            return
        job.seconds = time.perf_counter() - t0
        if job.step_s:
            self.last_step_s = sum(job.step_s) / len(job.step_s)
        with self._cv:
            self._finish(job, "completed")
