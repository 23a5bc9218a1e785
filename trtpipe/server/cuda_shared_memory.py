"""CUDA shared memory (the KServe/Triton extension): tensors passed through GPU memory by handle.

A client allocates device memory, exports it with ``cudaIpcGetMemHandle`` (what
``tritonclient.utils.cuda_shared_memory`` does) and registers the 64-byte handle under a name
with its device and byte size; inputs and outputs then name the region, an offset and a byte
size exactly as with system shared memory, and share its registry and checks
(``trtpipe.server.shared_memory``): only how the bytes move differs.

The server opens the handle on the named device (``cudaIpcOpenMemHandle``) and copies: device
to host for inputs (before inference, so a client that reuses the region cannot change a request
already accepted) and host to device for outputs, through a pinned staging buffer on the
region's own stream. The runner still receives host arrays; handing the device pointers to a
TensorRT runner directly is not done (the batcher joins requests into one batch anyway).

Confined: the registered size must fit inside the allocation the handle maps (asked of the
driver, ``cuMemGetAddressRange``), and every tensor inside the registered size; else a 400,
never a copy outside it. GPU only: without a usable GPU, registering says why in one line.
Unregister (and server shutdown) closes the mapping (``cudaIpcCloseMemHandle``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from trtpipe.errors import TrtpipeError
from trtpipe.server.control_body import control_body
from trtpipe.server.protocol import SharedMemoryError, int_at_least
from trtpipe.server.shared_memory import (
    SystemSharedMemory,
    enabled_registry,
    json_reply,
)

log = logging.getLogger(__name__)

OFF_MESSAGE = (
    "this server does not support CUDA shared memory unless started with --allow-shared-memory"
)


class CudaRegion:
    """``byte_size`` bytes of another process's device memory, mapped on ``device_id``."""

    kind = "cuda"

    def __init__(self, name: str, device_id: int, byte_size: int, ptr: int) -> None:
        self.name, self.device_id, self.byte_size, self.ptr = name, device_id, byte_size, ptr
        self._stream: Any = None
        self._staging: Any = None
        self._lock = threading.Lock()  # one copy at a time through the staging buffer

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}

    def _stage(self, size: int) -> Any:
        """The region's stream and a pinned buffer of at least ``size`` bytes (grown, kept)."""
        from trtpipe import cuda

        cuda.set_device(self.device_id)  # CUDA's current device is per thread
        if self._stream is None:
            self._stream = cuda.Stream()
        if self._staging is None or self._staging.nbytes < size:
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            self._staging = cuda.PinnedHostBuffer(np.uint8, (size,))
        return self._staging

    def read_bytes(self, start: int, size: int) -> bytes:
        """``size`` bytes at ``start`` of the region (checked by the registry to fit)."""
        if size == 0:
            return b""
        from trtpipe import cuda

        with self._lock:
            staging = self._stage(size)
            cuda.memcpy_dtoh_async(staging.ptr, self.ptr + start, size, self._stream)
            self._stream.synchronize()
            return staging.array[:size].tobytes()

    def write_bytes(self, start: int, data: bytes) -> None:
        if not data:
            return
        from trtpipe import cuda

        with self._lock:
            staging = self._stage(len(data))
            staging.array[: len(data)] = np.frombuffer(data, np.uint8)
            cuda.memcpy_htod_async(self.ptr + start, staging.ptr, len(data), self._stream)
            self._stream.synchronize()  # the client reads the region once the reply arrives

    def close(self) -> None:
        from trtpipe.cuda_ipc import close_mem_handle

        with self._lock:
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            if self.ptr:
                ptr, self.ptr = self.ptr, 0
                close_mem_handle(ptr, self.device_id)
        log.info("unregistered CUDA shared memory region %s", self.name)


def register(
    registry: SystemSharedMemory, name: Any, raw_handle: Any, device_id: Any, byte_size: Any
) -> None:
    """Open ``raw_handle`` (the 64 handle bytes) on ``device_id`` as region ``name``."""
    from trtpipe import cuda
    from trtpipe.cuda_ipc import HANDLE_SIZE, bytes_from, close_mem_handle, open_mem_handle

    if not isinstance(name, str) or not name:
        raise SharedMemoryError("a CUDA shared memory region needs a name")
    device_id = int_at_least(device_id, "device_id")
    byte_size = int_at_least(byte_size, "byte_size", 1)
    if not isinstance(raw_handle, bytes) or len(raw_handle) != HANDLE_SIZE:
        size = len(raw_handle) if isinstance(raw_handle, bytes) else type(raw_handle).__name__
        raise SharedMemoryError(
            f"CUDA shared memory region {name!r}: raw_handle must be the {HANDLE_SIZE} bytes of "
            f"a cudaIpcMemHandle_t, got {size}"
        )
    if registry.is_registered(name):
        raise SharedMemoryError(
            f"shared memory region {name!r} is already registered; unregister it first"
        )
    reason = cuda.unusable_reason()
    if reason is not None:
        raise SharedMemoryError(f"CUDA shared memory needs a GPU: {reason}")
    count = cuda.device_count()
    if device_id >= count:
        raise SharedMemoryError(
            f"CUDA shared memory region {name!r}: device_id {device_id} does not exist "
            f"({count} visible device{'s' if count != 1 else ''})"
        )
    try:
        ptr = open_mem_handle(raw_handle, device_id)
    except TrtpipeError as exc:
        raise SharedMemoryError(
            f"unable to open CUDA shared memory region {name!r} on device {device_id}: {exc}"
        ) from None
    try:
        available = bytes_from(ptr)
    except TrtpipeError as exc:
        close_mem_handle(ptr, device_id)
        raise SharedMemoryError(
            f"CUDA shared memory region {name!r}: cannot confirm its size, refused: {exc}"
        ) from None
    if byte_size > available:
        close_mem_handle(ptr, device_id)
        raise SharedMemoryError(
            f"CUDA shared memory region {name!r}: byte_size {byte_size} is past the end of the "
            f"allocation its handle names ({available} bytes)"
        )
    registry.add(CudaRegion(name, device_id, byte_size, ptr))
    log.info(
        "registered CUDA shared memory region %s (device %d, %d bytes)", name, device_id, byte_size
    )


def decode_raw_handle(value: Any) -> bytes:
    """HTTP's ``{"b64": "..."}`` -> the handle bytes."""
    if not isinstance(value, dict) or not isinstance(value.get("b64"), str):
        raise SharedMemoryError('raw_handle must be {"b64": "<base64 of the handle bytes>"}')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise SharedMemoryError("raw_handle.b64 is not valid base64") from None


# -- HTTP routes ---------------------------------------------------------------------------------
def cuda_shared_memory_router(registry: SystemSharedMemory | None) -> APIRouter:
    """``/v2/cudasharedmemory[/region/{name}]/status|register|unregister``."""
    import asyncio

    router = APIRouter()

    def enabled() -> SystemSharedMemory:
        return enabled_registry(registry, OFF_MESSAGE)  # the CUDA extension's own wording

    ok = json_reply

    @router.get("/v2/cudasharedmemory/status")
    @router.get("/v2/cudasharedmemory/region/{name}/status")
    async def status(name: str = "") -> Response:
        return ok(enabled().status(name, kind="cuda"))

    @router.post("/v2/cudasharedmemory/region/{name}/register")
    async def register_route(name: str, request: Request) -> Response:
        shm = enabled()
        doc = await control_body(request)  # a small JSON object, read with a size limit
        if not {"raw_handle", "device_id", "byte_size"} <= set(doc):
            raise SharedMemoryError(
                "register needs a JSON object with raw_handle, device_id and byte_size"
            )
        raw = decode_raw_handle(doc["raw_handle"])
        # Opening a handle is a driver call that can take milliseconds: off the event loop.
        await asyncio.to_thread(register, shm, name, raw, doc["device_id"], doc["byte_size"])
        return ok()

    @router.post("/v2/cudasharedmemory/unregister")
    @router.post("/v2/cudasharedmemory/region/{name}/unregister")
    async def unregister(name: str = "") -> Response:
        shm = enabled()
        await asyncio.to_thread(shm.unregister, name, "cuda")
        return ok()

    return router


# -- gRPC (called by trtpipe.server.grpc's servicer) ---------------------------------------------
def grpc_register(registry: SystemSharedMemory, request: Any) -> None:
    register(
        registry, request.name, bytes(request.raw_handle), request.device_id, request.byte_size
    )


def grpc_status(registry: SystemSharedMemory, request: Any, service_pb2: Any) -> Any:
    response = service_pb2.CudaSharedMemoryStatusResponse()
    status = service_pb2.CudaSharedMemoryStatusResponse.RegionStatus
    for region in registry.status(request.name, kind="cuda"):
        response.regions[region["name"]].CopyFrom(status(**region))
    return response
