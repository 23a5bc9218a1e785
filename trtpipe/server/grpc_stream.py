"""gRPC ``ModelStreamInfer``: many requests on one bidirectional stream, answered as they run.

Each request runs in its own task, so a long generation does not hold back the requests sent
after it; its responses keep their order. A generation model with ``stream`` true answers one
response per token (``generation_v2.grpc_stream``), anything else one response. A failing
request answers one response carrying its ``error_message`` and the stream stays open for the
next ones. When the client goes away, grpc cancels the handler and every request still running
is cancelled with it (a generation gives back its batch row at the next step).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from tritonclient.grpc import service_pb2

from trtpipe.server.errors import classify

log = logging.getLogger(__name__)


async def responses(servicer: Any, request: Any) -> AsyncIterator[Any]:
    """The ModelInferResponses of one request on the stream."""
    repository = servicer.repository
    if request.model_name in repository.generators:
        from trtpipe.server.generation_v2 import grpc_stream

        model = repository.describe(request.model_name, request.model_version)
        async for response in grpc_stream(model, request, repository.shared_memory):
            yield response
    else:
        yield await servicer.infer_tensor(request)


async def serve_stream(servicer: Any, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """ModelStreamInferResponses for the ``requests`` of one stream (see the module docstring)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    done = object()

    async def answer(request: Any) -> None:
        try:
            async for response in responses(servicer, request):
                queue.put_nowait(service_pb2.ModelStreamInferResponse(infer_response=response))
        except Exception as exc:
            head = service_pb2.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            )
            message = classify(exc).message
            queue.put_nowait(
                service_pb2.ModelStreamInferResponse(error_message=message, infer_response=head)
            )

    async def read() -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:  # the client closed its side: finish what it sent
                await asyncio.wait(set(tasks))
        finally:
            queue.put_nowait(done)

    reader = asyncio.create_task(read())
    try:
        while (item := await queue.get()) is not done:
            yield item
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
