"""The HTTP API of `fluxc serve` (FastAPI), with the Gradio page mounted at / (fluxc/serve/page.py).

GET    /health                     {"status": "loading" | "ready" | "failed" | "stopped", "queue": waiting
                                   jobs, "running": 0 or 1}
GET    /v1/models                  the build: flux type, quantisation, chip, backend, sizes, LoRAs, load time
POST   /v1/images/generations      OpenAI's images API: waits, then {"created", "data": [{"b64_json", "seed"}]}
POST   /v1/images/edits            OpenAI's edit form (multipart: image, prompt, n, size, ...; strength on
                                   img2img builds): img2img, or FLUX.1 Kontext editing; answers as above
POST   /v1/images/jobs             the same request (JSON, or an edit's multipart form) as a job: 202 {"id", "status": "queued", "position"}
GET    /v1/images/jobs/{id}        queued (position) | generating (image, step of steps) | completed (data)
                                   | failed (error) | cancelled
DELETE /v1/images/jobs/{id}        cancel it (a running job stops at its next step)

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}: 400 for a bad field (named
in `param` and the message), 401 without the API key (when one is set), 404 for an unknown job,
429 when the queue is full, 503 while loading or shutting down, 500 when the pipeline failed.
"""
from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fluxc.serve.jobs import NotReady, QueueFull, Worker
from fluxc.serve.request import MAX_BODY, MAX_IMAGE_BODY, BadRequest, parse_edit, parse_json, parse_request

DRAIN = 16 * MAX_BODY
IMAGE_DRAIN = 2 * MAX_IMAGE_BODY


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


async def read_body(request: Request, limit: int = MAX_BODY, drain: int = DRAIN) -> bytes:
    """The body, refused past MAX_BODY bytes. A body up to DRAIN bytes is read to its end first, so
    that a client that sends it all before reading (most do) gets the 400 rather than a broken pipe;
    a larger one is answered at once and the connection closed."""
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        declared = 0
    if declared > drain:
        raise BadRequest("body", f"{declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > drain:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise BadRequest("body", f"{size if size <= drain else 'more than ' + str(drain)} bytes is over the "
                                 f"{limit}-byte limit")
    return b"".join(chunks)


def create_app(worker: Worker, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="fluxc serve", docs_url=None, redoc_url=None, openapi_url=None)
    want = f"Bearer {api_key}".encode() if api_key else None

    def denied(request: Request) -> JSONResponse | None:
        if want is None:
            return None
        got = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(got, want):
            return None
        return error(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                     "authorization", "authentication_error", {"WWW-Authenticate": "Bearer"})

    def not_ready() -> JSONResponse:
        if worker.status == "loading":
            return error(503, "the model is still loading; poll GET /health until it says ready", None,
                         "server_error", {"Retry-After": "5"})
        return error(503, f"the model is {worker.status}" + (f": {worker.error}" if worker.error else ""),
                     None, "server_error")

    async def parse_generation(request: Request):
        doc = parse_json(await read_body(request))
        if worker.status != "ready":
            return None
        m = worker.model
        return parse_request(doc, m.sizes, m.default_steps, m.image_mode)

    async def parse_edit_form(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise BadRequest("body", f"a multipart/form-data body is expected (OpenAI's edit form), not "
                                     f"{ctype or 'none'!r}; e.g. curl -F image=@in.png -F prompt=...")
        body = await read_body(request, MAX_IMAGE_BODY, IMAGE_DRAIN)
        request._body = body  # starlette reads the form from the cached body
        try:
            form = await request.form(max_files=2, max_fields=32)
        except Exception as e:  # noqa: BLE001 - a malformed multipart body
            raise BadRequest("body", f"malformed multipart form ({str(e)[:80]})") from None
        fields, image = {}, None
        for k, v in form.multi_items():
            if k == "image" and hasattr(v, "read"):
                image = await v.read()
            elif hasattr(v, "read"):
                fields[k] = v  # a file in another field: parse_edit names it
            else:
                fields[k] = v
        if worker.status != "ready":
            return None
        m = worker.model
        return parse_edit(fields, image, m.sizes, m.default_steps, m.image_mode)

    async def submit(request: Request, parse=None):
        if (resp := denied(request)) is not None:
            return None, resp
        try:
            req = await (parse or parse_generation)(request)
            if req is None:
                return None, not_ready()
        except BadRequest as e:
            return None, error(400, e.message, e.param)
        try:
            return worker.submit(req), None
        except QueueFull as e:
            return None, error(429, str(e), None, "rate_limit_error", {"Retry-After": "10"})
        except NotReady:
            return None, not_ready()

    @app.get("/health")
    async def health():
        d = {"status": worker.status, "queue": worker.queue_length(), "running": int(worker.busy())}
        if worker.error and worker.status == "failed":
            d["error"] = worker.error
        return d

    @app.get("/v1/models")
    async def models(request: Request):
        if (resp := denied(request)) is not None:
            return resp
        m = worker.model
        if m is None:
            return {"object": "list", "data": [], "status": worker.status}
        info = m.info()
        info["step_s"] = round(worker.last_step_s, 4) if worker.last_step_s else None
        mid = f"flux.1-{info['flux_type']}-{info['quantize'].lower()}"
        return {"object": "list", "status": worker.status,
                "data": [{"id": mid, "object": "model", "created": int(time.time()), "owned_by": "fluxc", **info}]}

    async def wait_answer(request: Request, job):
        while not job.done.is_set():
            await asyncio.sleep(0.05)
            if not job.done.is_set() and await request.is_disconnected():
                worker.cancel(job, "the client went away")
                return error(499, "the client went away", None, "server_error")
        if job.status == "completed":
            return {"created": job.created, "data": job.data()}
        if job.status == "failed":
            return error(500, job.error or "the pipeline failed", None, "server_error")
        return error(503, f"cancelled: {job.error}", None, "server_error")

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        job, resp = await submit(request)
        return resp if resp is not None else await wait_answer(request, job)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        job, resp = await submit(request, parse_edit_form)
        return resp if resp is not None else await wait_answer(request, job)

    @app.post("/v1/images/jobs", status_code=202)
    async def create_job(request: Request):
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        job, resp = await submit(request, parse_edit_form if multipart else None)  # an edit as a job
        if resp is not None:
            return resp
        return JSONResponse(worker.state(job), status_code=202)

    def find(request: Request, job_id: str):
        if (resp := denied(request)) is not None:
            return None, resp
        job = worker.get(job_id)
        if job is None:
            return None, error(404, f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)", "id")
        return job, None

    @app.get("/v1/images/jobs/{job_id}")
    async def get_job(request: Request, job_id: str):
        job, resp = find(request, job_id)
        return resp if resp is not None else worker.state(job)

    @app.delete("/v1/images/jobs/{job_id}")
    async def cancel_job(request: Request, job_id: str):
        job, resp = find(request, job_id)
        if resp is not None:
            return resp
        worker.cancel(job)
        return worker.state(job)

    return app
