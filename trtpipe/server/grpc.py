"""KServe v2 over gRPC (grpc.aio) with the service stubs that ship in ``tritonclient``.

Inputs come as ``raw_input_contents`` (what tritonclient sends) or typed ``contents``; outputs
always go back as ``raw_output_contents``, like Triton. Errors map to status codes in
:mod:`trtpipe.server.errors`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from trtpipe import __version__
from trtpipe.server.errors import classify
from trtpipe.server.grpc_codec import decode_request, encode_response
from trtpipe.server.http import EXTENSIONS, SERVER_NAME, ServerState
from trtpipe.server.protocol import select_outputs
from trtpipe.server.repository import ModelRepository

log = logging.getLogger(__name__)
T = TypeVar("T")


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 gRPC service over a model repository."""

    def __init__(self, repository: ModelRepository, state: ServerState):
        self.repository = repository
        self.state = state

    async def _guard(self, context: Any, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except Exception as exc:
            wire = classify(exc)
            await context.abort(getattr(grpc.StatusCode, wire.grpc_code), wire.message)
            raise  # unreachable: abort raises

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.state.ready(self.repository))

    async def ModelReady(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            if request.name in self.repository.available and (
                request.name not in self.repository.models
                and request.name not in self.repository.generators
            ):  # in the repository, not loaded: not ready (as Triton answers)
                return service_pb2.ModelReadyResponse(ready=False)
            model = self.repository.describe(request.name, request.version)
            ready = model.ready and self.state.started and not self.state.draining
            return service_pb2.ModelReadyResponse(ready=ready)

        return await self._guard(context, work)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            doc = self.repository.describe(request.name, request.version).metadata()
            return json_format.ParseDict(
                doc, service_pb2.ModelMetadataResponse(), ignore_unknown_fields=True
            )

        return await self._guard(context, work)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            doc = self.repository.describe(request.name, request.version).model_config()
            config = json_format.ParseDict(
                doc, model_config_pb2.ModelConfig(), ignore_unknown_fields=True
            )
            return service_pb2.ModelConfigResponse(config=config)

        return await self._guard(context, work)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            # Generation models too, as HTTP's /v2/models/stats gives them.
            if request.name:
                models = [self.repository.describe(request.name, request.version)]
            else:
                models = self.repository.every_model
            response = service_pb2.ModelStatisticsResponse()
            for model in models:
                json_format.ParseDict(
                    model.statistics(), response.model_stats.add(), ignore_unknown_fields=True
                )
            return response

        return await self._guard(context, work)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        """Every served model with its state, as HTTP's ``/v2/repository/index`` lists them."""
        response = service_pb2.RepositoryIndexResponse()
        for entry in repository_index(self.repository):
            if request.ready and entry["state"] != "READY":
                continue
            response.models.add(**entry)
        return response

    # -- system shared memory (trtpipe.server.shared_memory; off without --allow-shared-memory)
    async def _shared_memory(self, method: str, context: Any, work: Callable[[Any], Any]) -> Any:
        shm = self.repository.shared_memory
        if shm is None:
            from trtpipe.server import cuda_shared_memory, shared_memory

            off = (cuda_shared_memory if method.startswith("Cuda") else shared_memory).OFF_MESSAGE
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method}: {off}")

        async def run() -> Any:
            return work(shm)

        return await self._guard(context, run)

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        def work(shm: Any) -> Any:
            shm.register(request.name, request.key, request.offset, request.byte_size)
            return service_pb2.SystemSharedMemoryRegisterResponse()

        return await self._shared_memory("SystemSharedMemoryRegister", context, work)

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        def work(shm: Any) -> Any:
            response = service_pb2.SystemSharedMemoryStatusResponse()
            for region in shm.status(request.name):
                response.regions[region["name"]].CopyFrom(
                    service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(**region)
                )
            return response

        return await self._shared_memory("SystemSharedMemoryStatus", context, work)

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        def work(shm: Any) -> Any:
            shm.unregister(request.name)
            return service_pb2.SystemSharedMemoryUnregisterResponse()

        return await self._shared_memory("SystemSharedMemoryUnregister", context, work)

    # -- CUDA shared memory: the same registry and switch (trtpipe.server.cuda_shared_memory)
    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        from trtpipe.server.cuda_shared_memory import grpc_register

        def work(shm: Any) -> Any:
            grpc_register(shm, request)
            return service_pb2.CudaSharedMemoryRegisterResponse()

        return await self._shared_memory("CudaSharedMemoryRegister", context, work)

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        from trtpipe.server.cuda_shared_memory import grpc_status

        return await self._shared_memory(
            "CudaSharedMemoryStatus", context, lambda shm: grpc_status(shm, request, service_pb2)
        )

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        def work(shm: Any) -> Any:
            shm.unregister(request.name, kind="cuda")
            return service_pb2.CudaSharedMemoryUnregisterResponse()

        return await self._shared_memory("CudaSharedMemoryUnregister", context, work)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        """Load (or reload) a model of the repository by name (explicit model control)."""

        async def work() -> Any:
            from trtpipe.server.repository_routes import check_load_parameters

            check_load_parameters(request.model_name, dict(request.parameters))
            await self.repository.load(request.model_name)
            return service_pb2.RepositoryModelLoadResponse()

        return await self._guard(context, work)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        """Unload a model by name once what it accepted has finished (explicit model control)."""

        async def work() -> Any:
            await self.repository.unload(request.model_name)
            return service_pb2.RepositoryModelUnloadResponse()

        return await self._guard(context, work)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            if request.model_name in self.repository.generators:  # text_input -> text_output
                from trtpipe.server.generation_v2 import grpc_infer

                model = self.repository.describe(request.model_name, request.model_version)
                return await grpc_infer(model, request, self.repository.shared_memory)
            return await self.infer_tensor(request)

        return await self._guard(context, work)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        """Requests answered as they run; generation streams a response per token
        (trtpipe.server.grpc_stream)."""
        from trtpipe.server.grpc_stream import serve_stream

        async for response in serve_stream(self, request_iterator):
            yield response

    async def infer_tensor(self, request: Any) -> Any:
        """One ModelInfer of a tensor model, counted in its statistics."""
        model = self.repository.get(request.model_name, request.model_version)
        started = time.perf_counter_ns()
        ok = False
        try:
            shm = self.repository.shared_memory
            decoded = decode_request(request, shm)
            produced = await model.infer(decoded)
            selected = select_outputs(produced, decoded.outputs, True)
            placed = None
            if shm is not None and any(o.shared_memory for o in decoded.outputs or ()):
                placed = shm.write_outputs(decoded.outputs, selected)
            response = encode_response(model.name, model.version, decoded.id, selected, placed)
            ok = True
            return response
        finally:
            model.record(ok, started)


def repository_index(repository: ModelRepository) -> list[dict[str, str]]:
    """name, version, state (READY / UNAVAILABLE / LOADING / UNLOADING) and reason of every
    model of the repository, loaded or not (the same list HTTP's index answers)."""
    return repository.index()


def _unsupported(method: str, what: str) -> Callable[..., Awaitable[Any]]:
    """A servicer method that answers UNIMPLEMENTED in one line (the generated default raises
    NotImplementedError, which grpc.aio logs with a traceback)."""

    async def answer(self: Any, request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{method}: this server does not support {what}"
        )

    answer.__name__ = method
    return answer


UNSUPPORTED = {
    "TraceSetting": "tracing",
    "LogSettings": "log settings",
}
for _method, _what in UNSUPPORTED.items():
    if _method not in InferenceServicer.__dict__:  # not implemented by the class itself
        setattr(InferenceServicer, _method, _unsupported(_method, _what))
