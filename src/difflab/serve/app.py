"""The routes of ``difflab serve`` (FastAPI): one page, its static files, and a small JSON API.

    GET  /                          the page (static/index.html, app.js, app.css: no build step, nothing fetched
                                    from elsewhere; the Content-Security-Policy allows this server only)
    GET  /api/models                the served models, the inputs each takes, the samplers and the limits
    POST /api/sample                a job (JSON, :mod:`difflab.serve.validate`); answers with a stream of
                                    server-sent events: job, queued, started, progress, preview, then one of
                                    done / failed / cancelled. The stream *is* the job: a client that goes
                                    away cancels it (at its next step, or at once while it waits)
    POST /api/jobs/{id}/cancel      cancel a job
    GET  /api/gallery               the results, newest first
    GET  /api/gallery/{id}/{file}   a result's file (settings.json, images.npz, grid.png, image_K.png, ...)
    DELETE /api/gallery/{id}        remove a result
    POST /api/uploads               an image (the raw bytes; size- and type-checked, stored as PNG): its id
    GET  /api/status                the queue (running, waiting, jobs held) and the server's memory

Every refusal is ``{"error": "one message"}`` with its status: 422 for a value out of bounds or not taken by the
model, 413 for a body over its limit, 415 for what is not JSON / not an image, 404 for an unknown id, 403 for
a request from another origin, 503 for a full queue. Nothing a request says is opened as a path: models and
classifiers are looked up by name, gallery files by id and a fixed set of names, uploads by the id the server
made.
"""

from __future__ import annotations

import asyncio
import io
import json
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from difflab.serve.gallery import Gallery
from difflab.serve.jobs import TERMINAL, Job, JobQueue, QueueFull
from difflab.serve.models import Limits, Registry, eta_samplers
from difflab.serve.sampling import run_plan
from difflab.serve.validate import RequestError, parse_request, plan_request

__all__ = ["create_app"]

STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
HEARTBEAT_S = 0.5
_UPLOAD_FORMATS = {"PNG", "JPEG", "GIF", "BMP", "WEBP"}
_UPLOAD_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}
_DRAIN_LIMIT = 128 * 1024 * 1024  # a body over its limit is read and dropped up to here, so the 413 arrives


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


class _Headers:
    """Pure ASGI middleware adding the security headers to every response (streams untouched)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                            (b"cache-control", b"no-store")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _JobStream(StreamingResponse):
    """The event stream of one job; its generator is closed however the response ends (a client that went away
    included), and the generator's ``finally`` cancels the job if it had not finished."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def _job_events(job: Job, queue: JobQueue):
    """Server-sent events of ``job`` until it ends; cancels it if the stream is closed first."""
    changed = job.subscribe()
    sent: dict[str, Any] = {"ahead": None, "state": None, "progress": None, "preview": 0}
    try:
        yield _event("job", {"id": job.id, "seq": job.seq, "model": job.model, "ahead": job.ahead})
        while True:
            changed.clear()
            snap = job.snapshot()
            if snap["state"] == "queued" and snap["ahead"] != sent["ahead"]:
                sent["ahead"] = snap["ahead"]
                yield _event("queued", {"ahead": snap["ahead"]})
            if snap["state"] != sent["state"] and snap["state"] == "running":
                yield _event("started", {"seq": job.seq, "waited_s": round((job.started or 0) - job.created, 3)})
            sent["state"] = snap["state"]
            if snap["progress"] is not None and snap["progress"] != sent["progress"]:
                sent["progress"] = snap["progress"]
                yield _event("progress", snap["progress"])
            if snap["preview_version"] != sent["preview"]:
                sent["preview"] = snap["preview_version"]
                yield _event("preview", {"image": snap["preview"], "step": (snap["progress"] or {}).get("step")})
            if snap["state"] in TERMINAL:
                timing = {"seq": job.seq, "created": job.created, "started": job.started, "finished": job.finished}
                if snap["state"] == "done":
                    yield _event("done", {"entry": snap["result"], **timing})
                elif snap["state"] == "failed":
                    yield _event("failed", {"error": snap["error"], **timing})
                else:
                    yield _event("cancelled", timing)
                return
            try:
                await asyncio.wait_for(changed.wait(), HEARTBEAT_S)
            except asyncio.TimeoutError:  # noqa: UP041 - not the builtin before Python 3.11
                yield b": ping\n\n"  # a closed connection shows up here while the job waits
    finally:
        job.unsubscribe(changed)
        if job.state not in TERMINAL:
            queue.cancel(job)
        queue.forget(job)


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (read and dropped up to a bound, so the client gets the
    answer rather than a reset connection)."""
    declared = request.headers.get("content-length")
    body = bytearray()
    over = declared is not None and declared.isdigit() and int(declared) > limit
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            over = True
        if not over:
            body += chunk
        elif size > _DRAIN_LIMIT:
            break
    if over:
        shown = int(declared) if declared is not None and declared.isdigit() else size
        raise RequestError(f"{what} is {_mb(shown)}; the limit is {_mb(limit)}", 413)
    return bytes(body)


def _check_origin(request: Request) -> None:
    """Refuse a state-changing request sent by a page of another origin (a site the user visits)."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "")
    if origin.split("://", 1)[-1].rstrip("/") != host:
        raise RequestError(f"cross-origin request from {origin} refused", 403)


def _check_upload(data: bytes, limits: Limits) -> bytes:
    """The uploaded bytes as a PNG, after checking that they are one image of an allowed format, mode and size."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError("the upload is empty; send the image's bytes", 422)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in _UPLOAD_FORMATS:
                raise RequestError(f"{im.format} images are not taken; send PNG, JPEG, GIF, BMP or WebP", 415)
            w, h = im.size
            if w * h > limits.max_upload_pixels:
                raise RequestError(f"the image is {w}x{h}; the limit is {limits.max_upload_pixels} pixels", 422)
            if im.mode not in _UPLOAD_MODES:
                raise RequestError(f"image mode {im.mode} is not taken; send an 8-bit grey or RGB image", 415)
            im.load()
            out = io.BytesIO()
            im.save(out, format="PNG")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise RequestError("the upload is not an image (send PNG, JPEG, GIF, BMP or WebP)", 415) from None
    return out.getvalue()


def create_app(registry: Registry, gallery: Gallery, limits: Limits | None = None, *,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The web app over ``registry``'s models, writing results to ``gallery``. ``allowed_hosts``: the Host
    headers answered (loopback names when serving on loopback, against DNS rebinding); None answers any."""
    limits = limits or Limits()
    queue = JobQueue(limits.max_queue)
    app = FastAPI(title="difflab serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.gallery, app.state.queue, app.state.limits = registry, gallery, queue, limits
    static = resources.files("difflab.serve") / "static"
    page = (static / "index.html").read_text(encoding="utf-8")
    files = {name: (static / name).read_bytes() for name in STATIC_FILES}

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404 and detail == "Not Found":
            detail = f"not found: {request.url.path}"
        return JSONResponse({"error": detail}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        return JSONResponse({"error": f"{where}: {err.get('msg')}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in files:
            raise RequestError(f"no static file {name!r}", 404)
        return Response(files[name], media_type=STATIC_FILES[name])

    @app.get("/favicon.ico")
    async def favicon():
        return Response(files["favicon.svg"], media_type="image/svg+xml")

    @app.get("/api/models")
    async def models():
        from difflab.generate import sampler_names

        return {"models": registry.describe(), "samplers": sampler_names(), "eta_samplers": eta_samplers(),
                "limits": {"max_n": limits.max_n, "max_steps": limits.max_steps, "max_prompt": limits.max_prompt,
                           "max_upload_bytes": limits.max_upload_bytes}}

    @app.post("/api/sample")
    async def sample(request: Request):
        _check_origin(request)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise RequestError("send the request as JSON (Content-Type: application/json)", 415)
        body = await _read_body(request, limits.max_json_bytes, "the request")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request is not valid JSON: {e}", 422) from None
        if not isinstance(data, dict):
            raise RequestError("the request must be a JSON object of settings", 422)
        req = parse_request(data)
        plan = await run_in_threadpool(plan_request, req, registry, limits, gallery)
        try:
            job = queue.submit(plan.model.name, lambda job: run_plan(plan, gallery, job))
        except QueueFull as e:
            raise RequestError(str(e), 503) from None
        return _JobStream(_job_events(job, queue), media_type="text/event-stream",
                          headers={"x-accel-buffering": "no"})

    @app.get("/api/jobs/{job_id}")
    async def job_state(job_id: str):
        job = queue.jobs.get(job_id)
        if job is None:
            raise RequestError(f"no job {job_id[:40]!r} (finished jobs are in the gallery)", 404)
        snap = job.snapshot()
        snap.pop("preview")
        return {"id": job.id, "seq": job.seq, "model": job.model, **snap}

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: str, request: Request):
        _check_origin(request)
        job = queue.jobs.get(job_id)
        if job is None:
            raise RequestError(f"no job {job_id[:40]!r}", 404)
        return {"cancelled": queue.cancel(job)}

    @app.get("/api/gallery")
    async def gallery_list():
        return {"entries": gallery.list()}

    @app.get("/api/gallery/{entry_id}/{name}")
    async def gallery_file(entry_id: str, name: str):
        try:
            path = gallery.file(entry_id, name)
        except KeyError as e:
            raise RequestError(e.args[0], 404) from None
        media = {"png": "image/png", "json": "application/json", "yaml": "text/plain; charset=utf-8",
                 "npz": "application/octet-stream"}[name.rsplit(".", 1)[-1]]
        return FileResponse(path, media_type=media, filename=name if media == "application/octet-stream" else None)

    @app.delete("/api/gallery/{entry_id}")
    async def gallery_delete(entry_id: str, request: Request):
        _check_origin(request)
        try:
            gallery.delete(entry_id)
        except KeyError as e:
            raise RequestError(e.args[0], 404) from None
        return {"deleted": entry_id}

    @app.post("/api/uploads")
    async def upload(request: Request):
        _check_origin(request)
        data = await _read_body(request, limits.max_upload_bytes, "the upload")
        png = await run_in_threadpool(_check_upload, data, limits)
        from PIL import Image

        with Image.open(io.BytesIO(png)) as im:
            width, height, mode = im.width, im.height, im.mode
        return {"id": gallery.store_upload(png), "width": width, "height": height, "mode": mode}

    @app.get("/api/status")
    async def status():
        return {**queue.status(), "rss_mb": _rss_mb()}

    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    app.add_middleware(_Headers)
    return app
