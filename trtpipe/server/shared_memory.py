"""System shared memory (the KServe/Triton extension): tensors passed through POSIX shm regions.

A client creates a region (``shm_open``, what ``tritonclient.utils.shared_memory`` does),
registers it under a name with a key, offset and byte size, and then names the region, an offset
and a byte size in an input or output instead of sending the bytes. The server maps the region
and copies inputs out of it / outputs into it.

Off unless the server is started with ``--allow-shared-memory``: it lets a client have the
server read and write memory by name. Confined: a key is a plain shm name (no path), a region
must lie inside its shm object, and every input or output must lie inside its registered
region; anything else is a 400 and never a read or write outside it. Data is copied out of the
region before inference, so a client that reuses or unregisters a region cannot change a
request already accepted.

The registry also holds CUDA shared memory regions (``trtpipe.server.cuda_shared_memory``): one
name space for both kinds, as in Triton, and the same checks; a region's kind decides how its
bytes are read and written.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response

from trtpipe.errors import InputError
from trtpipe.server.control_body import control_body
from trtpipe.server.protocol import (
    RequestedOutput,
    SharedMemoryError,
    SharedMemoryRef,
    int_at_least,
    raw_data,
)

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
KEY_PATTERN = re.compile(r"/?[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")
OFF_MESSAGE = (
    "this server does not support system shared memory unless started with --allow-shared-memory"
)


@dataclass
class Region:
    """A system shared memory region; a CUDA region (``CudaRegion``) has the same methods."""

    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap
    kind = "system"

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }

    def read_bytes(self, start: int, size: int) -> bytes:
        """``size`` bytes at ``start`` of the region (checked by the caller to fit)."""
        start += self.offset
        return self.mapping[start : start + size]

    def write_bytes(self, start: int, data: bytes) -> None:
        start += self.offset
        self.mapping[start : start + len(data)] = data

    def close(self) -> None:
        self.mapping.close()


class SystemSharedMemory:
    """The registered regions of one server (thread-safe: HTTP, gRPC and worker threads)."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str, key: str, offset: Any, byte_size: Any) -> None:
        if not isinstance(name, str) or not name:
            raise SharedMemoryError("a shared memory region needs a name")
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key) or key.strip("/.") == "":
            raise SharedMemoryError(
                f"shared memory key {key!r} is not a plain shm name (e.g. /input_data)"
            )
        offset = int_at_least(offset, "offset")
        byte_size = int_at_least(byte_size, "byte_size", 1)
        path = SHM_DIR / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise SharedMemoryError(
                f"unable to open shared memory region {name!r}: no shm object {key!r}"
            ) from None
        except OSError as exc:
            raise SharedMemoryError(f"unable to open shared memory key {key!r}: {exc}") from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise SharedMemoryError(
                    f"shared memory region {name!r}: offset {offset} + byte_size {byte_size} is "
                    f"past the end of {key!r} ({size} bytes)"
                )
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.add(Region(name, key, offset, byte_size, mapping))
        log.info("registered shared memory region %s (%s, %d bytes)", name, key, byte_size)

    def is_registered(self, name: str) -> bool:
        with self._lock:
            return name in self._regions

    def add(self, region: Any) -> None:
        """A region opened by its kind's register; closed again if the name is taken."""
        with self._lock:
            if region.name in self._regions:
                region.close()
                raise SharedMemoryError(
                    f"shared memory region {region.name!r} is already registered; unregister "
                    "it first"
                )
            self._regions[region.name] = region

    def status(self, name: str | None = None, kind: str = "system") -> list[dict[str, Any]]:
        with self._lock:
            if name:
                region = self._regions.get(name)
                if region is None or region.kind != kind:
                    what = "CUDA" if kind == "cuda" else kind
                    raise SharedMemoryError(f"unable to find {what} shared memory region: {name!r}")
                return [region.status()]
            return [r.status() for r in self._regions.values() if r.kind == kind]

    def unregister(self, name: str | None = None, kind: str = "system") -> None:
        """One region of ``kind``, or every one when ``name`` is empty (unknown names are not an
        error)."""
        with self._lock:
            names = [name] if name else list(self._regions)
            for key in names:
                region = self._regions.get(key)
                if region is not None and region.kind == kind:
                    del self._regions[key]
                    region.close()

    def close(self) -> None:
        """Every region of every kind (server shutdown)."""
        with self._lock:
            regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            try:
                region.close()
            except Exception as exc:  # shutting down: say so, close the others
                log.warning("closing shared memory region %s failed: %s", region.name, exc)

    # -- data -------------------------------------------------------------------------------
    def _span(self, ref: SharedMemoryRef, size: int, tensor: str) -> tuple[Any, int]:
        """The region and the start of ``size`` bytes at ``ref`` in it; checked to fit."""
        region = self._regions.get(ref.region)
        if region is None:
            raise SharedMemoryError(
                f"tensor {tensor!r}: shared memory region {ref.region!r} is not registered"
            )
        if ref.offset + size > region.byte_size:
            raise SharedMemoryError(
                f"tensor {tensor!r}: {size} bytes at offset {ref.offset} run past the end of "
                f"shared memory region {ref.region!r} ({region.byte_size} bytes registered)"
            )
        return region, ref.offset

    def read(self, ref: SharedMemoryRef, tensor: str) -> bytes:
        """A copy of an input's ``byte_size`` bytes at ``offset`` in its region."""
        with self._lock:
            region, start = self._span(ref, ref.byte_size, tensor)
            return region.read_bytes(start, ref.byte_size)

    def write(self, ref: SharedMemoryRef, data: bytes, tensor: str) -> None:
        if len(data) > ref.byte_size:
            raise SharedMemoryError(
                f"output {tensor!r} is {len(data)} bytes, more than the {ref.byte_size} bytes of "
                f"shared memory the request gave it"
            )
        with self._lock:
            region, start = self._span(ref, len(data), tensor)
            region.write_bytes(start, data)

    def write_outputs(
        self,
        requested: Sequence[RequestedOutput] | None,
        selected: list[tuple[str, np.ndarray, bool]],
    ) -> dict[str, dict[str, Any]]:
        """Outputs that name a region written into it; name -> the response's parameters."""
        refs = {o.name: o.shared_memory for o in requested or () if o.shared_memory is not None}
        placed: dict[str, dict[str, Any]] = {}
        for name, array, _ in selected:
            ref = refs.get(name)
            if ref is None:
                continue
            data = raw_data(array)
            self.write(ref, data, name)
            placed[name] = {
                "shared_memory_region": ref.region,
                "shared_memory_byte_size": len(data),
            }
            if ref.offset:
                placed[name]["shared_memory_offset"] = ref.offset
        return placed


# -- HTTP routes ---------------------------------------------------------------------------------
def enabled_registry(
    registry: SystemSharedMemory | None, off_message: str = OFF_MESSAGE
) -> SystemSharedMemory:
    """The registry, or the 400 saying the extension is off (``--allow-shared-memory``)."""
    if registry is None:
        raise InputError(off_message)
    return registry


def json_reply(body: Any = None) -> Response:
    """A shared-memory route's answer: empty, or ``body`` as JSON."""
    import orjson

    return Response(b"" if body is None else orjson.dumps(body), media_type="application/json")


def shared_memory_router(registry: SystemSharedMemory | None) -> APIRouter:
    """``/v2/systemsharedmemory[/region/{name}]/status|register|unregister`` (and the same
    under ``/v2/cudasharedmemory``)."""
    router = APIRouter()

    def enabled() -> SystemSharedMemory:
        return enabled_registry(registry)

    ok = json_reply

    @router.get("/v2/systemsharedmemory/status")
    @router.get("/v2/systemsharedmemory/region/{name}/status")
    async def status(name: str = "") -> Response:
        return ok(enabled().status(name))

    @router.post("/v2/systemsharedmemory/region/{name}/register")
    async def register(name: str, request: Request) -> Response:
        shm = enabled()
        doc = await control_body(request)  # a small JSON object, read with a size limit
        if "key" not in doc or "byte_size" not in doc:
            raise SharedMemoryError("register needs a JSON object with key, offset and byte_size")
        shm.register(name, doc["key"], doc.get("offset", 0), doc["byte_size"])
        return ok()

    @router.post("/v2/systemsharedmemory/unregister")
    @router.post("/v2/systemsharedmemory/region/{name}/unregister")
    async def unregister(name: str = "") -> Response:
        enabled().unregister(name)
        return ok()

    return router
