"""The Starlette application: Open Inference Protocol routes, the classify route, error bodies.

Every refusal is ``{"error": "..."}`` with a 4xx status (the protocol's error body); a
request never takes the server down. Model names are only looked up in a dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import zlib
from typing import AsyncIterator, Awaitable, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from onnxmod import __version__
from onnxmod.errors import OnnxmodError
from onnxmod.serve.batching import Batcher
from onnxmod.serve.model import VERSION, ServedModel
from onnxmod.serve.protocol import HEADER_LENGTH, ApiError, bad, encode_infer, parse_infer

log = logging.getLogger("onnxmod.serve")

SERVER_NAME = "onnxmod"
EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_repository"]
MAX_FILES = 1024  # images per classify request (the body size bounds them too)
# decoded pixels of all the images of one classify request, summed from their headers before any is decoded
# (each image may have data.MAX_IMAGE_PIXELS): two images of that size, 12 MB compressed, decode to 150 MB
MAX_REQUEST_PIXELS = 50_000_000
DECODE_SLOTS = 2  # classify requests decoding images at once (each decodes one image at a time)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (413), by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            await _error(400, f"Content-Length {length[:20]!r} is not a number")(scope, receive, send)
            return
        if length is not None and (len(length) > 18 or int(length) > self.max_bytes):
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"request body over the server's limit of {limit} bytes (--max-body-mb)")


class Registry:
    """Served models by name, each with its batcher."""

    def __init__(self, models: list[ServedModel], max_batch: int, max_delay_s: float, max_body_bytes: int,
                 instances: int = 1):
        self.models = {m.name: m for m in models}
        self.batchers = {m.name: Batcher(m.run, max_batch, max_delay_s, m.name, instances, fixed_shape=m.device == "cuda")
                         for m in models}
        self.max_batch, self.max_body_bytes = max_batch, max_body_bytes
        self.decode_slots = asyncio.Semaphore(DECODE_SLOTS)

    def get(self, request: Request) -> tuple[ServedModel, Batcher]:
        name = request.path_params["name"]
        if name not in self.models:
            raise ApiError(404, f"unknown model '{name}' (serving {', '.join(sorted(self.models))})")
        version = request.path_params.get("version")
        if version is not None and version != VERSION:
            raise ApiError(404, f"model '{name}' has no version '{version}' (only '{VERSION}')")
        return self.models[name], self.batchers[name]

    def ready(self) -> bool:
        return all(b.running for b in self.batchers.values())


Handler = Callable[[Request], Awaitable[Response]]


def _endpoint(fn: Callable[[Request, Registry], Awaitable[Response]]) -> Handler:
    """Route handler with the registry, and every failure turned into an ``{"error"}`` response."""

    async def handler(request: Request) -> Response:
        try:
            return await fn(request, request.app.state.registry)
        except ApiError as e:
            return _error(e.status, e.message)
        except BodyTooLarge:
            return _too_large(request.app.state.registry.max_body_bytes)
        except OnnxmodError as e:
            return _error(400, str(e))
        except ClientDisconnect:  # the read timeout closed a half-sent request, or the client went away
            return _error(400, "the client disconnected before the request was complete")
        except HTTPException:
            raise
        except Exception as e:  # a bug or an onnxruntime failure: logged, answered, and the server goes on
            log.exception("request %s %s failed", request.method, request.url.path)
            first_line = (str(e).strip().splitlines() or [""])[0]
            return _error(500, f"internal error: {type(e).__name__}: {first_line}")

    return handler


async def _body(request: Request, limit: int) -> bytes:
    """Request body, decompressed when it says gzip/deflate (tritonclient's request compression), bounded."""
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, f"unsupported Content-Encoding '{encoding}' (gzip, deflate or none)")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise bad(f"{encoding} body does not decompress: {e}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge()
    if not inflater.eof:
        raise bad(f"{encoding} body is truncated")
    return out


# --------------------------------------------------------------------------- routes
async def live(request: Request, reg: Registry) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request, reg: Registry) -> Response:
    ok = reg.ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


async def server_metadata(request: Request, reg: Registry) -> Response:
    return JSONResponse({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})


async def model_metadata(request: Request, reg: Registry) -> Response:
    model, _ = reg.get(request)
    return JSONResponse(model.metadata(reg.max_batch))


async def model_ready(request: Request, reg: Registry) -> Response:
    _, batcher = reg.get(request)
    return JSONResponse({"name": request.path_params["name"], "ready": batcher.running},
                        status_code=200 if batcher.running else 503)


async def repository_index(request: Request, reg: Registry) -> Response:
    return JSONResponse([{"name": n, "version": VERSION, "state": "READY" if reg.batchers[n].running else "UNAVAILABLE"}
                         for n in sorted(reg.models)])


async def all_stats(request: Request, reg: Registry) -> Response:
    return JSONResponse({"model_stats": [reg.batchers[n].stats.to_json(n, VERSION) for n in sorted(reg.models)]})


async def model_stats(request: Request, reg: Registry) -> Response:
    model, batcher = reg.get(request)
    return JSONResponse({"model_stats": [batcher.stats.to_json(model.name, VERSION)]})


async def _run(batcher: Batcher, x) -> list:
    try:
        return await batcher.infer(x)
    except RuntimeError as e:
        if "shutting down" in str(e) or "not running" in str(e):
            raise ApiError(503, f"model unavailable: {e}") from None
        raise


async def infer(request: Request, reg: Registry) -> Response:
    model, batcher = reg.get(request)
    body = await _body(request, reg.max_body_bytes)
    req = parse_infer(body, request.headers.get(HEADER_LENGTH), model.input, model.outputs)
    outs = await _run(batcher, req.x)
    payload, headers = encode_infer(model.name, VERSION, req, dict(zip(model.output_names, outs)),
                                    {o.name: o.datatype for o in model.outputs}, model.classes)
    return Response(payload, headers=headers)


def _top(request: Request) -> int:
    raw = request.query_params.get("top", "3")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or int(raw) < 1:
        raise bad(f"top={raw[:20]!r}: expected a positive integer")
    return int(raw)


def _header_pixels(blob: bytes) -> int:
    """Pixels an image file says it has (its header only; 0 when unreadable: decoding then names the file)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(blob)) as img:
                return int(img.width) * int(img.height)
    except Exception:  # noqa: BLE001 - any unreadable header: decode_image gives the file's own error
        return 0


def _check_request_pixels(names: list[str], blobs: list[bytes]) -> None:
    sizes = [_header_pixels(b) for b in blobs]
    if sum(sizes) > MAX_REQUEST_PIXELS:
        biggest = max(range(len(sizes)), key=sizes.__getitem__)
        raise ApiError(413, f"{len(blobs)} images of {sum(sizes):,} pixels in all (the largest '{names[biggest]}', "
                            f"{sizes[biggest]:,}): more than the {MAX_REQUEST_PIXELS:,} one classify request may "
                            "decode; send them in several requests")


async def classify(request: Request, reg: Registry) -> Response:
    """Image files (multipart/form-data, any field names) -> label and top probabilities, as ``predict``."""
    from starlette.concurrency import run_in_threadpool

    from onnxmod.cli.cmd_compose import rank_predictions
    from onnxmod.data import decode_image, fit_image

    model, batcher = reg.get(request)
    top = _top(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "classify takes multipart/form-data with one or more image files")
    form = await request.form(max_files=MAX_FILES)
    try:
        uploads = [(key, v) for key, v in form.multi_items() if not isinstance(v, str)]
        names = [u.filename or key for key, u in uploads]
        blobs = [await u.read() for _, u in uploads]
    finally:
        await form.close()  # spooled uploads go away whatever happens
    if not uploads:
        raise bad("no image files in the form")

    def decode_all():
        _check_request_pixels(names, blobs)
        return np.stack([fit_image(decode_image(io.BytesIO(b), n, model.chw[0]), model.chw[1:])
                         for n, b in zip(names, blobs)])

    async with reg.decode_slots:  # a bounded number of decodes at once: memory stays bounded under load
        x = await run_in_threadpool(decode_all)  # Pillow off the event loop
    outs = dict(zip(model.output_names, await _run(batcher, x)))
    preds = rank_predictions(model.proto, [outs[model.prediction_output]], names, top, model.name)
    return JSONResponse({"model_name": model.name, "model_version": VERSION, "predictions": preds})


def _routes() -> list[Route]:
    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2/health/live", _endpoint(live)),
        Route("/v2/health/ready", _endpoint(ready)),
        Route("/v2", _endpoint(server_metadata)),
        Route("/v2/repository/index", _endpoint(repository_index), methods=["POST"]),
        Route("/v2/models/stats", _endpoint(all_stats)),
    ]
    for base in (model, versioned):
        routes += [
            Route(base, _endpoint(model_metadata)),
            Route(base + "/ready", _endpoint(model_ready)),
            Route(base + "/stats", _endpoint(model_stats)),
            Route(base + "/infer", _endpoint(infer), methods=["POST"]),
            Route(base + "/classify", _endpoint(classify), methods=["POST"]),
        ]
    return routes


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return _error(exc.status_code, message)


def create_app(models: list[ServedModel], max_batch: int = 64, max_delay_ms: float = 2.0,
               max_body_bytes: int = 64 << 20, instances: int = 2) -> ASGIApp:
    """The ASGI app serving ``models``; batchers start and stop with the app's lifespan."""
    registry = Registry(models, max_batch, max_delay_ms / 1000.0, max_body_bytes, instances)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for m in models:  # a fixed-shape model's first run sets up cuDNN (~0.5 s): not on a caller's time
            if registry.batchers[m.name].fixed_shape:
                await asyncio.to_thread(m.run, np.zeros((max_batch, *m.chw), np.float32))
        for b in registry.batchers.values():
            b.start()
        try:
            yield
        finally:
            for b in registry.batchers.values():
                await b.stop()

    app = Starlette(routes=_routes(), lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.registry = registry
    return BodyLimit(app, max_body_bytes)

