"""KServe v2 over HTTP (FastAPI, run by uvicorn) plus OpenAI-compatible ``/v1/embeddings``.

Every error is a JSON ``{"error": "..."}`` (OpenAI shape under ``/v1``) with the status chosen in
:mod:`trtpipe.server.errors`; no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse as _StdJSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trtpipe import __version__
from trtpipe.errors import TrtpipeError
from trtpipe.server.errors import ModelNotFoundError, WireError, classify
from trtpipe.server.metrics import CONTENT_TYPE, ServerMetrics
from trtpipe.server.protocol import (
    BodyTooLarge,
    ProtocolError,
    encode_http_response,
    parse_http_request,
    select_outputs,
)
from trtpipe.server.repository import ModelRepository
from trtpipe.server.schemas import (
    SchemaError,
    error_responses,
    install_openapi,
    parse_embeddings_document,
    request_body,
)
from trtpipe.server.served_model import ServedModel

log = logging.getLogger(__name__)

SERVER_NAME = "trtpipe"
EXTENSIONS = ["binary_tensor_data", "statistics", "model_configuration", "model_repository"]
HEADER_LENGTH = "inference-header-content-length"
OFFLOAD_BYTES = 1 << 20  # decode/encode bodies larger than this off the event loop
MAX_EMBEDDING_INPUTS = 2048
# The generation routes' paths (their routes exist only where a generation model can be served).
GENERATION_PATH = re.compile(
    r"/v2/models/[^/]+(/versions/[^/]+)?/generate(_stream)?|/v1/(chat/)?completions"
)


@dataclass
class ServerState:
    """Shared by the front ends: ready only once every front end listens, and not while draining."""

    started: bool = False
    draining: bool = False

    def ready(self, repository: ModelRepository) -> bool:
        return self.started and not self.draining and repository.ready


class JSONResponse(_StdJSONResponse):
    """JSON rendered by orjson (numpy arrays included): several times faster than json."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


class OpenAIError(Exception):
    """Wraps an error raised under /v1 so it is rendered in OpenAI's error shape."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, never holding more than ``limit`` bytes (the rest is read and dropped).

    Reading past the limit lets the client receive the 400 instead of a reset connection.
    """
    declared = request.headers.get("content-length")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= limit:
            chunks.append(chunk)
        else:
            chunks.clear()
    if total > limit:
        raise BodyTooLarge(
            f"request body is {declared or total} bytes, over the server limit of {limit} bytes "
            "(raise --max-body-mb)"
        )
    body = b"".join(chunks)
    encoding = (request.headers.get("content-encoding") or "").lower()
    if encoding in ("gzip", "deflate"):
        body = inflate(body, encoding, limit)
    elif encoding not in ("", "identity"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    return body


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decompressed (gzip or deflate), never past ``limit`` bytes (BodyTooLarge)."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or decoder.unconsumed_tail:
        raise BodyTooLarge(f"decompressed body is over the server limit of {limit} bytes")
    return out


def create_http_app(
    repository: ModelRepository,
    metrics: ServerMetrics,
    state: ServerState | None = None,
    max_body_bytes: int = 64 << 20,
) -> FastAPI:
    state = state or ServerState()
    app = FastAPI(
        title="trtpipe",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        default_response_class=JSONResponse,
    )
    install_openapi(app)  # the request documents the raw-body routes validate
    # Explicit model control may load a generation model later: the routes look it up live.
    serves_generation = bool(repository.generators) or repository.control_mode == "explicit"

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> Response:
        wire = classify(exc.cause)
        return Response(
            openai_error_body(wire), status_code=wire.http_status, media_type="application/json"
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{exc.detail}: {request.method} {request.url.path}"
        missing = exc.status_code == 404 and not serves_generation
        if missing and GENERATION_PATH.fullmatch(request.url.path):
            message += no_generation_hint(repository)
        return JSONResponse({"error": message}, status_code=exc.status_code)

    @app.exception_handler(TrtpipeError)
    async def trtpipe_error(request: Request, exc: TrtpipeError) -> JSONResponse:
        wire = classify(exc)
        return JSONResponse({"error": wire.message}, status_code=wire.http_status)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises these after answering, so uvicorn logs the traceback once.
        wire = classify(exc, log_unexpected=False)
        return JSONResponse({"error": wire.message}, status_code=wire.http_status)

    # -- health and metadata ---------------------------------------------------------------------
    @app.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = state.ready(repository)
        body = {
            "ready": ok,
            "started": state.started,
            "draining": state.draining,
            "models": {
                m.name: {"ready": m.ready, "devices": m.devices_status()}
                for m in repository.every_model
            },
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v2")
    async def metadata() -> JSONResponse:
        return JSONResponse(server_metadata())

    @app.get("/v2/models/stats")
    async def all_stats() -> JSONResponse:
        models = repository.every_model
        return JSONResponse({"model_stats": [m.statistics() for m in models]})

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str, version: str = "") -> JSONResponse:
        return JSONResponse({"model_stats": [repository.describe(name, version).statistics()]})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "") -> JSONResponse:
        return JSONResponse(repository.describe(name, version).metadata())

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = "") -> JSONResponse:
        model = repository.describe(name, version)
        ok = model.ready and state.started and not state.draining
        body = {"name": model.name, "ready": ok, "devices": model.devices_status()}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str = "") -> JSONResponse:
        return JSONResponse(repository.describe(name, version).model_config())

    # Repository extension: index, load, unload (trtpipe.server.repository_routes).
    from trtpipe.server.repository_routes import repository_router

    app.include_router(repository_router(repository))
    # System and CUDA shared memory extensions (answer 400 unless --allow-shared-memory).
    from trtpipe.server.cuda_shared_memory import cuda_shared_memory_router
    from trtpipe.server.shared_memory import shared_memory_router

    app.include_router(shared_memory_router(repository.shared_memory))
    app.include_router(cuda_shared_memory_router(repository.shared_memory))

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # -- inference ------------------------------------------------------------------------------
    infer_body, infer_errors = request_body("InferRequest"), error_responses()

    @app.post("/v2/models/{name}/infer", openapi_extra=infer_body, responses=infer_errors)
    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        openapi_extra=infer_body,
        responses=infer_errors,
    )
    async def infer(name: str, request: Request, version: str = "") -> Response:
        # Served by trtpipe.server.fast_path for tensor models; generation models land here.
        if name in repository.generators:  # text_input -> text_output (generation_v2)
            from trtpipe.server.generation_v2 import http_infer

            payload, header_length = await http_infer(
                repository.describe(name, version),
                await read_body(request, max_body_bytes),
                request.headers.get(HEADER_LENGTH),
                repository.shared_memory,
                request,
            )
        else:
            payload, header_length = await infer_reply(
                repository,
                name,
                version,
                lambda: read_body(request, max_body_bytes),
                request.headers.get(HEADER_LENGTH),
            )
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_length)},
        )

    # -- OpenAI-compatible -----------------------------------------------------------------------
    if serves_generation:
        from trtpipe.server.generate_routes import generate_router

        app.include_router(generate_router(repository.generators, repository.missing_generation))

    @app.get("/v1/models")
    async def openai_models() -> JSONResponse:
        created = int(time.time())
        names = [m.name for m in repository] + sorted(repository.generators)
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": SERVER_NAME}
            for name in names
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id}")
    async def openai_model(model_id: str) -> JSONResponse:
        if model_id not in repository.names:
            raise OpenAIError(
                ModelNotFoundError(f"unknown model {model_id!r}; models: {repository.names}")
            )
        doc = {"id": model_id, "object": "model", "created": 0, "owned_by": SERVER_NAME}
        return JSONResponse(doc)

    @app.post(
        "/v1/embeddings",
        openapi_extra=request_body("EmbeddingsRequest"),
        responses=error_responses(openai=True),
    )
    async def embeddings(request: Request) -> Response:
        # Served by trtpipe.server.fast_path; kept for /openapi.json and direct ASGI use.
        try:
            payload = await embeddings_reply(repository, lambda: read_body(request, max_body_bytes))
        except Exception as exc:
            raise OpenAIError(exc) from exc
        return Response(payload, media_type="application/json")

    return app


BodyReader = Callable[[], Awaitable[bytes]]


async def infer_reply(
    repository: ModelRepository,
    name: str,
    version: str,
    read: BodyReader,
    header_length: str | None,
) -> tuple[bytes, int | None]:
    """One v2 infer request of a tensor model, counted in the model's statistics."""
    model = repository.get(name, version)
    started = time.perf_counter_ns()
    ok = False
    try:
        body = await read()
        reply = await run_infer(model, body, header_length, repository.shared_memory)
        ok = True
        return reply
    finally:
        model.record(ok, started)


async def embeddings_reply(repository: ModelRepository, read: BodyReader) -> bytes:
    """One /v1/embeddings request: the OpenAI response body, counted in the model's statistics."""
    texts, model, encoding = parse_embeddings_request(await read(), repository)
    started = time.perf_counter_ns()
    ok = False
    try:
        vectors, tokens = await model.embed(texts)
        ok = True
    finally:
        model.record(ok, started)
    # Float vectors stay numpy arrays: orjson writes them without a Python list.
    data = [
        {"object": "embedding", "index": i, "embedding": embedding_value(v, encoding)}
        for i, v in enumerate(vectors)
    ]
    document = {
        "object": "list",
        "data": data,
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def no_generation_hint(repository: ModelRepository) -> str:
    """Why a generation route is missing: the server was started without a generation model
    (the routes exist whenever one is served or may be loaded)."""
    return (
        f"; this server serves no text-generation model (its models {repository.names} take "
        "POST /v2/models/NAME/infer); to generate, serve a decoder engine (trtpipe export "
        "MODEL --task text-generation-with-past, then trtpipe build)"
    )


def openai_error_body(wire: WireError) -> bytes:
    """An error in OpenAI's shape (what the openai client parses)."""
    kind = "invalid_request_error" if wire.http_status < 500 else "server_error"
    error = {"message": wire.message, "type": kind, "param": None, "code": None}
    return orjson.dumps({"error": error})


async def run_infer(
    model: ServedModel, body: bytes, header_length: str | None, shared_memory: Any = None
) -> tuple[bytes, int | None]:
    """``shared_memory``: the server's system shared memory regions (None: extension off)."""
    large = len(body) > OFFLOAD_BYTES
    if large:
        request = await asyncio.to_thread(parse_http_request, body, header_length, shared_memory)
    else:
        request = parse_http_request(body, header_length, shared_memory)
    produced = await model.infer(request)
    selected = select_outputs(produced, request.outputs, request.binary_default)
    placed = None
    if shared_memory is not None and any(o.shared_memory for o in request.outputs or ()):
        placed = shared_memory.write_outputs(request.outputs, selected)
    size = sum(array.nbytes for _, array, _ in selected)
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(
            encode_http_response, model.name, model.version, request.id, selected, None, placed
        )
    return encode_http_response(model.name, model.version, request.id, selected, None, placed)


def parse_embeddings_request(
    body: bytes, repository: ModelRepository
) -> tuple[list[str], ServedModel, str]:
    try:  # one pass: JSON parse and schema (schemas.EmbeddingsRequest)
        doc = parse_embeddings_document(body)
    except SchemaError as exc:
        raise ProtocolError(str(exc)) from None
    name = doc.get("model")
    if name is None:
        embedders = [m for m in repository if m.is_embedding_model]
        if len(embedders) != 1:
            raise ProtocolError(
                f"'model' is required; embedding models: {[m.name for m in embedders]}"
            )
        model = embedders[0]
    else:
        model = repository.get(name)
    raw = doc.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise ProtocolError("'input' must be a string or a non-empty list of strings")
    if not all(isinstance(t, str) for t in texts):
        raise ProtocolError("'input' must hold strings (token-id input is not supported)")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise ProtocolError(f"'input' holds {len(texts)} texts; at most {MAX_EMBEDDING_INPUTS}")
    encoding = doc.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ProtocolError(f"encoding_format {encoding!r} is not supported; use float or base64")
    if doc.get("dimensions") is not None:
        raise ProtocolError("'dimensions' is not supported: the engine's width is fixed")
    if not model.is_embedding_model:
        raise ProtocolError(
            f"model {model.name!r} is a {model.manifest.task} engine; /v1/embeddings needs a "
            "feature-extraction engine"
        )
    return texts, model, encoding


def embedding_value(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32)


__all__ = ["ModelNotFoundError", "ServerState", "create_http_app"]
