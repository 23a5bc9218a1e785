"""HTTP routes of the KServe/Triton model repository extension: index, load, unload.

``POST /v2/repository/index`` lists every model of the repository with its state (body
``{"ready": true}`` keeps the ready ones); ``POST /v2/repository/models/{name}/load`` and
``.../unload`` answer 200 with an empty body once the model is ready / drained and released,
as Triton does. Load parameters that would change the model (``config``, ``file:...``) are
refused: a trtpipe model is its engine dir.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from trtpipe.server.control_body import control_body
from trtpipe.server.protocol import ProtocolError
from trtpipe.server.repository import ModelRepository


def check_load_parameters(name: str, params: dict[str, Any]) -> None:
    """``config`` and ``file:`` overrides describe a Triton model; a trtpipe model is fixed."""
    refused = sorted(k for k in params if k == "config" or k.startswith("file:"))
    if refused:
        raise ProtocolError(
            f"load of {name!r}: parameters {refused} are not supported (a trtpipe model is its "
            "engine dir: rebuild it, then load again)"
        )


def repository_router(repository: ModelRepository) -> APIRouter:
    router = APIRouter()

    @router.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        doc = await control_body(request)
        ready_only = doc.get("ready", False)
        if not isinstance(ready_only, bool):
            raise ProtocolError("'ready' must be true or false")
        return Response(orjson.dumps(repository.index(ready_only)), media_type="application/json")

    @router.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request) -> Response:
        doc = await control_body(request)
        check_load_parameters(name, doc.get("parameters", {}))
        await repository.load(name)
        return Response(b"", status_code=200)

    @router.post("/v2/repository/models/{name}/unload")
    async def unload(name: str, request: Request) -> Response:
        await control_body(request)
        await repository.unload(name)
        return Response(b"", status_code=200)

    return router
