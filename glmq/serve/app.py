"""The HTTP side of ``glmq serve``: a Starlette application over a :class:`~glmq.serve.batcher.Batcher`.

Routes: ``POST /v1/images/generations`` (JSON), ``POST /v1/images/edits`` (multipart), ``GET /v1/models``,
``GET /health`` (also ``/healthz``) and ``GET /metrics`` (Prometheus text; ``?format=json`` for JSON).
Every error, ours or the framework's (404, 405, 413, a malformed form), is answered in OpenAI's error shape.

A request is parsed and checked completely before it is queued. While it waits, its handler watches the
connection: a client that disconnects cancels its job (:meth:`Batcher.cancel`). Images are encoded in a
worker thread of the event loop, never in the GPU worker.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from glmq.serve.api import IMAGE_PARTS, OUTPUT_FORMATS, ApiError, Limits, parse_edit, parse_generation
from glmq.serve.batcher import Batcher, Job, Result
from glmq.serve.metrics import Metrics

DISCONNECT_POLL_S = 0.2  # how often a waiting handler checks that its client is still there
CLIENT_GONE = 499  # nginx's status for "client closed the request", recorded in the metrics


@dataclass
class ServerState:
    """What the routes need besides the batcher: limits, the model's description, and whether we drain."""

    limits: Limits
    model: str = "glm-image"
    info: dict = field(default_factory=dict)  # device, memory mode: shown by /health
    draining: bool = False


def _error(e: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return _error(e, headers)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return _error(ApiError(e.status_code, str(e.detail), code=codes.get(e.status_code, "invalid_request")), e.headers)


async def _server_error(request: Request, e: Exception) -> JSONResponse:
    # Starlette's ServerErrorMiddleware logs the traceback; the client gets the shape it expects.
    return _error(ApiError(500, "internal server error", code="internal_error"))


class _CountAnswers:
    """ASGI middleware: count every answer to the image endpoints by status (errors from handlers included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/images/"):
            return await self.app(scope, receive, send)
        endpoint = scope["path"].rsplit("/", 1)[-1]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.request(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


class _LimitBody:
    """ASGI middleware: refuse a request body larger than its endpoint takes, with a 413 in OpenAI's shape,
    before reading it when Content-Length says so, and as soon as the bytes read pass the limit otherwise."""

    def __init__(self, app, limits: dict[str, int]):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        limit = self.limits.get(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than this endpoint takes ({limit} bytes)",
                             code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _error(too_large)(scope, receive, send)
        read = 0

        async def limited_receive():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > limit:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


def _encode(images: list, output_format: str) -> list[str]:
    out = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format=OUTPUT_FORMATS[output_format])
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def create_app(batcher: Batcher, metrics: Metrics, state: ServerState) -> Starlette:
    limits = state.limits

    async def run(request: Request, job: Job) -> Response:
        batcher.check_fits(job.request)
        batcher.submit(job)  # 429 when the queue is full, 503 while shutting down
        waiting = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if done:
                    break
                if await request.is_disconnected():
                    batcher.cancel(job)
                    return Response(status_code=CLIENT_GONE)
        finally:
            if not waiting.done():  # the handler itself was cancelled (the server's shutdown deadline)
                batcher.cancel(job)
        result: Result = waiting.result()  # raises the job's ApiError
        data = await run_in_threadpool(_encode, result.images, job.request.output_format)
        metrics.delivered(len(data), time.perf_counter() - job.accepted)
        req = job.request
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": b64, "seed": seed} for b64, seed in zip(data, result.seeds)],
            "size": f"{req.width}x{req.height}", "output_format": req.output_format,
        })

    def refuse_while_draining() -> None:
        if state.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")

    async def generations(request: Request) -> Response:
        refuse_while_draining()
        body = await request.body()
        return await run(request, Job(parse_generation(body, limits)))

    async def edits(request: Request) -> Response:
        refuse_while_draining()
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            raise ApiError(400, "edits take a multipart/form-data body (image files and form fields)",
                           code="invalid_content_type")
        async with request.form(max_files=limits.max_references + 1, max_fields=64,
                                max_part_size=4 * limits.max_prompt_chars + 1024) as form:
            fields, uploads = {}, []
            for name, value in form.multi_items():
                if name in IMAGE_PARTS:
                    if isinstance(value, str):
                        raise ApiError(400, f"{name} must be a file upload", param=name, code="invalid_type")
                    uploads.append((name, await value.read(limits.max_upload_bytes + 1)))
                elif name in fields:
                    raise ApiError(400, f"{name} was sent more than once", param=name, code="invalid_value")
                elif not isinstance(value, str) and name != "mask":
                    raise ApiError(400, f"{name} must be a form field, not a file", param=name, code="invalid_type")
                else:
                    fields[name] = value
        request_ = await run_in_threadpool(parse_edit, fields, uploads, limits)
        return await run(request, Job(request_))

    async def health(request: Request) -> Response:
        body = {"status": "draining" if state.draining else "ok", "model": state.model, **state.info,
                **batcher.gauges()}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": state.model, "object": "model", "owned_by": "glmq"}]})

    async def metrics_(request: Request) -> Response:
        gauges = batcher.gauges()
        if request.query_params.get("format") == "json":
            return JSONResponse(metrics.as_dict(gauges))
        return PlainTextResponse(metrics.prometheus(gauges), media_type="text/plain; version=0.0.4")

    routes = [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/metrics", metrics_, methods=["GET"]),
    ]
    body_limits = {"/v1/images/generations": limits.body_bytes(edits=False),
                   "/v1/images/edits": limits.body_bytes(edits=True)}
    return Starlette(routes=routes,
                     middleware=[Middleware(_CountAnswers, metrics=metrics), Middleware(_LimitBody, limits=body_limits)],
                     exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
