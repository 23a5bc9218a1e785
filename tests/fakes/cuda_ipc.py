"""TEST DOUBLE of CUDA IPC memory handles (``cudaIpcGetMemHandle`` / ``cudaIpcOpenMemHandle`` /
``cudaIpcCloseMemHandle``), part of the fake ``cuda.bindings.runtime``: no GPU is involved.

Tests run client and server in one Python process, so the fake keeps a notion of *processes*:
each thread belongs to the process named by :func:`other_process` (default ``"server"``).
It is strict where real CUDA (13.x documentation and observed behaviour) fails:

* a handle is 64 opaque bytes naming one live ``cudaMalloc`` allocation (its base pointer, in the
  exporting process); a pointer inside an allocation, or another process's pointer, is refused;
* opening a handle in the process that exported it fails with ``cudaErrorDeviceUninitialized``
  ("invalid device context"), as real CUDA does;
* opening a handle whose allocation was freed, or bytes that name nothing, fails with
  ``cudaErrorInvalidResourceHandle``; ``flags`` must be ``cudaIpcMemLazyEnablePeerAccess``;
* the handle is opened on the *current* device; the fake has no peer access, so a handle of
  another device's memory fails with ``cudaErrorPeerAccessUnsupported`` (real CUDA may map it
  through peer access: the project always opens on the handle's own device);
* opening a handle already open in this process returns the same pointer and counts a
  reference (documented CUDA behaviour); each open needs its own ``cudaIpcCloseMemHandle``,
  which must be called in the opening process with the mapping's device current;
* reads and writes through a mapping whose exporter freed the memory fail (real CUDA: undefined);
* open mappings count as live device memory in ``STATE.leaks()["device"]`` and are listed in
  ``STATE.ipc.mappings``.
"""

from __future__ import annotations

import contextlib
import ctypes
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CUDA_IPC_HANDLE_SIZE = 64
cudaIpcMemLazyEnablePeerAccess = 1
IPC_BASE = 0x7F00_0000_0000  # where the fake maps imported handles (apart from cudaMalloc's)
DEFAULT_PROCESS = "server"


class cudaIpcMemHandle_t:
    """64 bytes of handle; ``getPtr()`` is their address (cuda-python 13 exposes only that)."""

    def __init__(self) -> None:
        self._bytes = (ctypes.c_char * CUDA_IPC_HANDLE_SIZE)()

    def getPtr(self) -> int:
        return ctypes.addressof(self._bytes)


@dataclass
class Export:
    base: int
    process: str


@dataclass
class Mapping:
    allocation: Any  # the exporter's rt.Allocation: the same bytes, seen from another process
    process: str
    device: int
    references: int = 1


class IpcTable:
    """Exported handles and open mappings of the fake runtime (``rt.STATE.ipc``)."""

    def __init__(self) -> None:
        self.exports: dict[bytes, Export] = {}
        self.mappings: dict[int, Mapping] = {}
        self.next_ptr = IPC_BASE

    def find(self, ptr: int, nbytes: int) -> tuple[Any, int] | None:
        """The exporter's allocation behind ``[ptr, ptr + nbytes)`` of a mapping, and the offset."""
        for base, mapping in self.mappings.items():
            alloc = mapping.allocation
            if base <= ptr and ptr + nbytes <= base + alloc.nbytes and not alloc.freed:
                return alloc, ptr - base
        return None

    def freed(self, base: int) -> None:
        """The allocation at ``base`` was freed: its handles name nothing any more."""
        for raw in [raw for raw, export in self.exports.items() if export.base == base]:
            del self.exports[raw]

    def range_of(self, ptr: int) -> tuple[int, int] | None:
        """(base, size) of the allocation or mapping of the current process holding ``ptr``."""
        process = current_process()
        for base, alloc in rt.STATE.device_allocs.items():
            if alloc.process == process and base <= ptr < base + alloc.nbytes:
                return base, alloc.nbytes
        for base, mapping in self.mappings.items():
            size = mapping.allocation.nbytes
            if mapping.process == process and base <= ptr < base + size:
                return base, size
        return None


def current_process() -> str:
    return getattr(rt.STATE.local, "process", DEFAULT_PROCESS)


@contextlib.contextmanager
def other_process(name: str) -> Iterator[None]:
    """Run this thread's CUDA calls as process ``name`` (e.g. the client of an IPC test)."""
    previous = current_process()
    rt.STATE.local.process = name
    try:
        yield
    finally:
        rt.STATE.local.process = previous


def cudaIpcGetMemHandle(devPtr: Any) -> tuple[Any, ...]:
    if (refused := rt._blocked(1)) is not None:
        return refused
    ptr, state = int(devPtr), rt.STATE
    with state.lock:
        alloc = state.device_allocs.get(ptr)
        if alloc is None or alloc.process != current_process():
            return rt._fail(
                rt.cudaError_t.cudaErrorInvalidValue,
                f"cudaIpcGetMemHandle({ptr:#x}): not the base of a cudaMalloc allocation of "
                "this process",
                1,
            )
        raw = next((r for r, e in state.ipc.exports.items() if e.base == ptr), None)
        if raw is None:
            raw = secrets.token_bytes(CUDA_IPC_HANDLE_SIZE)
            state.ipc.exports[raw] = Export(ptr, alloc.process)
    handle = cudaIpcMemHandle_t()
    ctypes.memmove(handle.getPtr(), raw, CUDA_IPC_HANDLE_SIZE)
    return rt._ok(handle)


def cudaIpcOpenMemHandle(handle: Any, flags: int) -> tuple[Any, ...]:
    if (refused := rt._blocked(1)) is not None:
        return refused
    if not isinstance(handle, cudaIpcMemHandle_t):
        return rt._fail(rt.cudaError_t.cudaErrorInvalidValue, "not a cudaIpcMemHandle_t", 1)
    if int(flags) != cudaIpcMemLazyEnablePeerAccess:
        return rt._fail(
            rt.cudaError_t.cudaErrorInvalidValue,
            f"flags {flags}: must be cudaIpcMemLazyEnablePeerAccess",
            1,
        )
    raw = bytes((ctypes.c_char * CUDA_IPC_HANDLE_SIZE).from_address(handle.getPtr()))
    state, process, device = rt.STATE, current_process(), rt.STATE.current_device()
    with state.lock:
        export = state.ipc.exports.get(raw)
        if export is None:
            return rt._fail(
                rt.cudaError_t.cudaErrorInvalidResourceHandle,
                "the handle names no live allocation (freed, or not a handle)",
                1,
            )
        if export.process == process:
            return rt._fail(
                rt.cudaError_t.cudaErrorDeviceUninitialized,
                "an IPC handle cannot be opened in the process that exported it",
                1,
            )
        alloc = state.device_allocs[export.base]
        if alloc.device != device:
            return rt._fail(
                rt.cudaError_t.cudaErrorPeerAccessUnsupported,
                f"handle of device {alloc.device} opened with device {device} current "
                "(fake devices are never peers)",
                1,
            )
        for base, mapping in state.ipc.mappings.items():
            if mapping.allocation is alloc and mapping.process == process:
                mapping.references += 1
                return rt._ok(base)
        base = state.ipc.next_ptr
        state.ipc.next_ptr += (alloc.nbytes + 511) // 256 * 256
        state.ipc.mappings[base] = Mapping(alloc, process, device)
    return rt._ok(base)


def cudaIpcCloseMemHandle(devPtr: Any) -> tuple[Any, ...]:
    if (refused := rt._blocked()) is not None:
        return refused
    ptr, state = int(devPtr), rt.STATE
    with state.lock:
        mapping = state.ipc.mappings.get(ptr)
        if mapping is None or mapping.process != current_process():
            return rt._fail(
                rt.cudaError_t.cudaErrorInvalidValue,
                f"cudaIpcCloseMemHandle({ptr:#x}): not a pointer cudaIpcOpenMemHandle returned "
                "in this process",
            )
        if mapping.device != state.current_device():
            return rt._fail(
                rt.cudaError_t.cudaErrorDeviceUninitialized,
                f"mapping of device {mapping.device} closed with device "
                f"{state.current_device()} current",
            )
        mapping.references -= 1
        if mapping.references == 0:
            del state.ipc.mappings[ptr]
    return rt._ok()


# Imported last: cuda_runtime builds its STATE with an IpcTable from this module.
from tests.fakes import cuda_runtime as rt  # noqa: E402
