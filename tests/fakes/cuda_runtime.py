"""TEST DOUBLE of ``cuda.bindings.runtime`` (cuda-python 13): no GPU is involved.

Only the calls trtpipe uses exist, with cuda-python 13's calling convention: every call returns
a tuple ``(cudaError_t, *values)``. It is strict where the real runtime (or the project's rules)
would fail:

* device pointers are fake addresses backed by numpy arrays; using an unknown or freed pointer
  gives ``cudaErrorInvalidValue``;
* ``cudaMemcpyAsync`` needs pinned host memory from ``cudaHostAlloc``/``cudaMallocHost`` on the
  host side (pageable numpy memory is refused) and a stream created here (never stream 0);
* work queued on a stream (copies, engine launches) runs only at ``cudaStreamSynchronize``, so
  reading results before synchronizing sees stale data, as on a GPU;
* streams belong to the device current at creation; queuing on them from a thread whose
  current device differs fails (CUDA's current device is per thread);
* pinned host memory counts as pinned only for the context that allocated it unless
  ``cudaHostAllocPortable`` (real CUDA would silently fall back to a synchronous pageable copy;
  the project wants asynchronous copies, so the fake refuses);
* allocations belong to the device current when they were made: a copy or launch on another
  device's stream that touches them fails (the project never copies across devices; real CUDA
  would do a slow peer copy or fault);
* device memory is limited per device (``State.total_memory``): a ``cudaMalloc`` past it fails
  with ``cudaErrorMemoryAllocation``, and ``cudaMemGetInfo`` reports the current device's free
  and total bytes from that limit and its live allocations; pinned host memory is limited too
  (``host_memory``);
* a fault inside queued work (illegal address, launch failure) is sticky, as in a real CUDA
  context: every later call that needs that device's context returns the same error;
* a driver older than the runtime (``State.driver_version < runtime_version``, cuda-python 13
  on a CUDA 12 driver) makes every call fail with ``cudaErrorInsufficientDriver``; with no driver
  at all the driver version reads 0;
* IPC memory handles follow CUDA's rules (``tests/fakes/cuda_ipc.py``: one process may not open
  its own handle, a freed allocation's handle names nothing, open/close are counted).

Device allocations are bookkeeping until first touched (their bytes are materialized lazily), so
a test can load an engine sized like an 8B-parameter model without the RAM.
``STATE`` counts allocations, frees, bytes and synchronizations so tests can assert budgets,
reuse and leaks.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IS_TEST_DOUBLE = True
DEVICE_BASE = 0x7E00_0000_0000  # fake device address space, never a host address


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidHostPointer = 16
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidMemcpyDirection = 21
    cudaErrorStubLibrary = 34
    cudaErrorInsufficientDriver = 35
    cudaErrorDevicesUnavailable = 46
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorDeviceUninitialized = 201
    cudaErrorPeerAccessUnsupported = 217
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700
    cudaErrorLaunchFailure = 719
    cudaErrorSystemNotReady = 802
    cudaErrorSystemDriverMismatch = 803
    cudaErrorCompatNotSupportedOnDevice = 804
    cudaErrorUnknown = 999


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


cudaStreamDefault = 0
cudaStreamNonBlocking = 1
cudaHostAllocDefault = 0
cudaHostAllocPortable = 1
cudaHostAllocMapped = 2
cudaHostAllocWriteCombined = 4

MESSAGES = {
    0: "no error",
    1: "invalid argument",
    2: "out of memory",
    16: "invalid host pointer",
    17: "invalid device pointer",
    21: "invalid copy direction for memcpy",
    34: "CUDA driver is a stub library",
    35: "CUDA driver version is insufficient for CUDA runtime version",
    46: "CUDA-capable device(s) is/are busy or unavailable",
    100: "no CUDA-capable device is detected",
    101: "invalid device ordinal",
    201: "invalid device context",
    217: "peer access is not supported between these two devices",
    400: "invalid resource handle",
    700: "an illegal memory access was encountered",
    719: "unspecified launch failure",
    802: "system not yet initialized",
    803: "system has unsupported display driver / cuda driver combination",
    804: "forward compatibility was attempted on non supported HW",
    999: "unknown error",
}
# Errors after which a CUDA context is unusable until the process ends.
STICKY = {cudaError_t.cudaErrorIllegalAddress, cudaError_t.cudaErrorLaunchFailure}


class cudaStream_t:
    """Opaque stream handle; ``int(stream)`` is the address, as in cuda-python."""

    __slots__ = ("_ptr",)

    def __init__(self, ptr: int = 0) -> None:
        self._ptr = int(ptr)

    def __int__(self) -> int:
        return self._ptr

    def getPtr(self) -> int:
        return self._ptr


@dataclass
class cudaDeviceProp:
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int = 80 << 30


class Allocation:
    """Device memory: ``nbytes`` on ``device``, its bytes made only when first touched.

    ``process``: the (simulated) process that allocated it, for IPC handles.
    """

    def __init__(self, nbytes: int, device: int, process: str = "server") -> None:
        self.nbytes, self.device, self.process = nbytes, device, process
        self.freed = False
        self.fresh = 0  # bytes written by host->device copies since the last launch read them
        self._data: np.ndarray | None = None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.zeros(self.nbytes, np.uint8)
        return self._data


@dataclass
class FakeStream:
    device: int
    pending: list[Callable[[], None]] = field(default_factory=list)
    synchronizations: int = 0


class State:
    """Everything the fake runtime tracks; reset by the install fixture."""

    def __init__(
        self,
        device_count: int = 1,
        capability: tuple[int, int] = (9, 0),
        total_memory: int = 80 << 30,
        host_memory: int = 64 << 30,
    ) -> None:
        self.lock = threading.RLock()
        self.device_count = device_count
        self.capability = capability
        self.device_name = b"Fake GPU (test double)"
        self.total_memory = total_memory  # per device, like cudaDeviceProp.totalGlobalMem
        self.host_memory = host_memory  # what the OS lets the process lock (pinned)
        self.driver_version = 13000  # cudaDriverGetVersion: 0 means no driver
        self.runtime_version = 13000  # cudaRuntimeGetVersion
        self.device_allocs: dict[int, Allocation] = {}
        self.host_allocs: dict[int, np.ndarray] = {}
        self.host_alloc_device: dict[int, int] = {}
        self.host_alloc_portable: set[int] = set()
        self.device_bytes: dict[int, int] = {}
        self.pinned_bytes: dict[int, int] = {}
        self.peak_device_bytes: dict[int, int] = {}
        self.peak_pinned_bytes: dict[int, int] = {}
        self.faults: dict[int, cudaError_t] = {}
        self.streams: dict[int, FakeStream] = {}
        self.next_device_ptr = DEVICE_BASE
        self.next_stream = 0x5000
        self.mallocs = self.frees = self.host_allocs_made = self.host_frees = 0
        self.synchronizations = 0
        self.last_error_detail = ""
        self.local = threading.local()
        from tests.fakes.cuda_ipc import IpcTable

        self.ipc = IpcTable()  # exported handles and open mappings

    # -- helpers used by the fake TensorRT -------------------------------------------------
    def current_device(self) -> int:
        return getattr(self.local, "device", 0)

    def find_device(self, ptr: int, nbytes: int) -> tuple[Allocation, int] | None:
        """The allocation holding ``[ptr, ptr + nbytes)`` and the offset into it."""
        for base, alloc in self.device_allocs.items():
            if base <= ptr and ptr + nbytes <= base + alloc.nbytes:
                return alloc, ptr - base
        return self.ipc.find(ptr, nbytes)

    def blocked(self) -> cudaError_t | None:
        """Why no call needing the current device's context can run: driver or sticky fault."""
        if self.driver_version < self.runtime_version:
            self.last_error_detail = (
                f"driver supports CUDA {self.driver_version}, runtime is {self.runtime_version}"
            )
            return cudaError_t.cudaErrorInsufficientDriver
        fault = self.faults.get(self.current_device())
        if fault is not None:
            self.last_error_detail = f"device {self.current_device()} faulted earlier (sticky)"
        return fault

    def find_host(
        self, ptr: int, nbytes: int, device: int | None = None
    ) -> tuple[np.ndarray, int] | None:
        """The pinned allocation holding ``[ptr, ptr + nbytes)``; with ``device``, only if it is
        pinned for that device's context (allocated there, or cudaHostAllocPortable)."""
        for base, array in self.host_allocs.items():
            if base <= ptr and ptr + nbytes <= base + array.nbytes:
                foreign = device is not None and self.host_alloc_device[base] != device
                if foreign and base not in self.host_alloc_portable:
                    return None
                return array, ptr - base
        return None

    def live_stream(self, handle: int) -> FakeStream | None:
        return self.streams.get(int(handle))

    def enqueue(self, handle: int, work: Callable[[], None]) -> cudaError_t:
        blocked = self.blocked()
        if blocked is not None:
            return blocked
        stream = self.streams.get(int(handle))
        if stream is None:
            return cudaError_t.cudaErrorInvalidResourceHandle
        if stream.device != self.current_device():
            self.last_error_detail = (
                f"stream of device {stream.device} used while device {self.current_device()} "
                "is current (call cudaSetDevice on this thread)"
            )
            return cudaError_t.cudaErrorInvalidResourceHandle
        stream.pending.append(work)
        return cudaError_t.cudaSuccess

    def fault(self, device: int, code: cudaError_t) -> None:
        """Make ``code`` stick to ``device``'s context (illegal address, launch failure)."""
        if code in STICKY:
            self.faults.setdefault(device, code)

    def leaks(self) -> dict[str, int]:
        """Live allocations; open IPC mappings count as device memory held."""
        return {
            "device": len(self.device_allocs) + len(self.ipc.mappings),
            "host": len(self.host_allocs),
            "streams": len(self.streams),
        }


STATE = State()


class DeviceFault(Exception):
    """Raised by queued work; cudaStreamSynchronize turns it into an error code."""

    def __init__(self, code: cudaError_t, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def _ok(*values: Any) -> tuple[Any, ...]:
    return (cudaError_t.cudaSuccess, *values)


def _fail(code: cudaError_t, detail: str, nvalues: int = 0) -> tuple[Any, ...]:
    STATE.last_error_detail = detail
    return (code, *([None] * nvalues))


def cudaGetErrorName(error: Any) -> tuple[Any, bytes]:
    return _ok(cudaError_t(int(error)).name.encode())  # type: ignore[return-value]


def cudaGetErrorString(error: Any) -> tuple[Any, bytes]:
    text = MESSAGES.get(int(error), "unknown error")
    if int(error) and STATE.last_error_detail:
        text += f" [fake: {STATE.last_error_detail}]"
    return _ok(text.encode())  # type: ignore[return-value]


def cudaDriverGetVersion() -> tuple[Any, ...]:
    return _ok(STATE.driver_version)


def cudaRuntimeGetVersion() -> tuple[Any, ...]:
    return _ok(STATE.runtime_version)


def _driver_too_old(nvalues: int = 0) -> tuple[Any, ...] | None:
    if STATE.driver_version < STATE.runtime_version:
        return _fail(
            cudaError_t.cudaErrorInsufficientDriver,
            f"driver supports CUDA {STATE.driver_version}, runtime is {STATE.runtime_version}",
            nvalues,
        )
    return None


def _blocked(nvalues: int = 0) -> tuple[Any, ...] | None:
    code = STATE.blocked()
    return None if code is None else (code, *([None] * nvalues))


def cudaGetDeviceCount() -> tuple[Any, ...]:
    if (refused := _driver_too_old(1)) is not None:
        return refused
    if STATE.device_count == 0:
        return _fail(cudaError_t.cudaErrorNoDevice, "no devices", 1)
    return _ok(STATE.device_count)


def cudaSetDevice(device: int) -> tuple[Any, ...]:
    if (refused := _driver_too_old()) is not None:
        return refused
    if not 0 <= int(device) < STATE.device_count:
        return _fail(cudaError_t.cudaErrorInvalidDevice, f"device {device} does not exist")
    STATE.local.device = int(device)
    return _ok()


def cudaGetDevice() -> tuple[Any, ...]:
    return _ok(STATE.current_device())


def cudaGetDeviceProperties(device: int) -> tuple[Any, ...]:
    if (refused := _driver_too_old(1)) is not None:
        return refused
    if not 0 <= int(device) < STATE.device_count:
        return _fail(cudaError_t.cudaErrorInvalidDevice, f"device {device} does not exist", 1)
    major, minor = STATE.capability
    return _ok(cudaDeviceProp(STATE.device_name, major, minor, STATE.total_memory))


def _count(usage: dict[int, int], peak: dict[int, int], device: int, nbytes: int) -> None:
    usage[device] = usage.get(device, 0) + nbytes
    peak[device] = max(peak.get(device, 0), usage[device])


def cudaMalloc(size: int) -> tuple[Any, ...]:
    if (refused := _blocked(1)) is not None:
        return refused
    if int(size) <= 0:
        return _fail(cudaError_t.cudaErrorInvalidValue, "cudaMalloc of 0 bytes", 1)
    device, size = STATE.current_device(), int(size)
    with STATE.lock:
        used = STATE.device_bytes.get(device, 0)
        if used + size > STATE.total_memory:
            return _fail(
                cudaError_t.cudaErrorMemoryAllocation,
                f"cudaMalloc({size}) on device {device}: {used} of {STATE.total_memory} bytes "
                "in use",
                1,
            )
        ptr = STATE.next_device_ptr
        STATE.next_device_ptr += (size + 511) // 256 * 256  # 256-aligned, with a gap
        STATE.device_allocs[ptr] = Allocation(size, device, cuda_ipc.current_process())
        _count(STATE.device_bytes, STATE.peak_device_bytes, device, size)
        STATE.mallocs += 1
    return _ok(ptr)


def cudaMemGetInfo() -> tuple[Any, ...]:
    """``(err, free, total)`` of the current device: its memory limit less its live allocations
    (open IPC mappings belong to the exporting process's device, not counted here)."""
    if (refused := _blocked(2)) is not None:
        return refused
    device = STATE.current_device()
    with STATE.lock:
        used = STATE.device_bytes.get(device, 0)
    return _ok(max(0, STATE.total_memory - used), STATE.total_memory)


def cudaFree(ptr: Any) -> tuple[Any, ...]:
    if (refused := _blocked()) is not None:
        return refused
    with STATE.lock:
        alloc = STATE.device_allocs.pop(int(ptr), None)
        if alloc is None:
            return _fail(cudaError_t.cudaErrorInvalidDevicePointer, f"cudaFree({int(ptr):#x})")
        alloc.freed = True
        STATE.ipc.freed(int(ptr))
        STATE.device_bytes[alloc.device] -= alloc.nbytes
        STATE.frees += 1
    return _ok()


def cudaHostAlloc(size: int, flags: int) -> tuple[Any, ...]:
    if (refused := _blocked(1)) is not None:
        return refused
    if int(size) <= 0 or int(flags) & ~7:
        return _fail(cudaError_t.cudaErrorInvalidValue, "bad cudaHostAlloc size/flags", 1)
    device, size = STATE.current_device(), int(size)
    with STATE.lock:
        locked = sum(STATE.pinned_bytes.values())
        if locked + size > STATE.host_memory:
            return _fail(
                cudaError_t.cudaErrorMemoryAllocation,
                f"cudaHostAlloc({size}): {locked} of {STATE.host_memory} bytes already pinned",
                1,
            )
        array = np.zeros(size, np.uint8)
        ptr = int(array.ctypes.data)
        STATE.host_allocs[ptr] = array
        STATE.host_alloc_device[ptr] = device
        if int(flags) & cudaHostAllocPortable:
            STATE.host_alloc_portable.add(ptr)
        _count(STATE.pinned_bytes, STATE.peak_pinned_bytes, device, size)
        STATE.host_allocs_made += 1
    return _ok(ptr)


def cudaMallocHost(size: int) -> tuple[Any, ...]:
    return cudaHostAlloc(size, cudaHostAllocDefault)


def cudaFreeHost(ptr: Any) -> tuple[Any, ...]:
    if (refused := _blocked()) is not None:
        return refused
    with STATE.lock:
        array = STATE.host_allocs.pop(int(ptr), None)
        if array is None:
            return _fail(cudaError_t.cudaErrorInvalidValue, f"cudaFreeHost({int(ptr):#x})")
        STATE.pinned_bytes[STATE.host_alloc_device.pop(int(ptr))] -= array.nbytes
        STATE.host_alloc_portable.discard(int(ptr))
        STATE.host_frees += 1
    return _ok()


def cudaStreamCreateWithFlags(flags: int) -> tuple[Any, ...]:
    if (refused := _blocked(1)) is not None:
        return refused
    if int(flags) not in (cudaStreamDefault, cudaStreamNonBlocking):
        return _fail(cudaError_t.cudaErrorInvalidValue, f"bad stream flags {flags}", 1)
    with STATE.lock:
        STATE.next_stream += 0x10
        STATE.streams[STATE.next_stream] = FakeStream(STATE.current_device())
        return _ok(cudaStream_t(STATE.next_stream))


def cudaStreamDestroy(stream: Any) -> tuple[Any, ...]:
    if (refused := _blocked()) is not None:
        return refused
    with STATE.lock:
        fake = STATE.streams.pop(int(stream), None)
    if fake is None:
        return _fail(cudaError_t.cudaErrorInvalidResourceHandle, f"stream {int(stream):#x}")
    return _ok()


def cudaMemcpyAsync(dst: Any, src: Any, count: int, kind: Any, stream: Any) -> tuple[Any, ...]:
    dst, src, count = int(dst), int(src), int(count)
    if (refused := _blocked()) is not None:
        return refused
    if int(stream) == 0:
        return _fail(
            cudaError_t.cudaErrorInvalidResourceHandle,
            "default stream used; trtpipe must copy on its own non-blocking stream",
        )
    live = STATE.live_stream(int(stream))
    context = live.device if live is not None else STATE.current_device()
    if int(kind) == cudaMemcpyKind.cudaMemcpyHostToDevice:
        host, device = STATE.find_host(src, count, context), STATE.find_device(dst, count)
        what = "source"
    elif int(kind) == cudaMemcpyKind.cudaMemcpyDeviceToHost:
        host, device = STATE.find_host(dst, count, context), STATE.find_device(src, count)
        what = "destination"
    else:
        return _fail(cudaError_t.cudaErrorInvalidMemcpyDirection, f"memcpy kind {kind}")
    if host is None:
        return _fail(
            cudaError_t.cudaErrorInvalidHostPointer,
            f"host {what} {src if what == 'source' else dst:#x} (+{count}) is not pinned memory "
            f"from cudaHostAlloc/cudaMallocHost of device {context}'s context (or portable)",
        )
    if device is None:
        return _fail(
            cudaError_t.cudaErrorInvalidDevicePointer, f"no device allocation for {count} bytes"
        )
    (harray, hoff), (alloc, doff) = host, device
    fake_stream = STATE.live_stream(int(stream))
    if fake_stream is not None and alloc.device != fake_stream.device:
        return _fail(
            cudaError_t.cudaErrorInvalidValue,
            f"device memory of device {alloc.device} copied on a stream of device "
            f"{fake_stream.device}",
        )

    def copy() -> None:
        if int(kind) == cudaMemcpyKind.cudaMemcpyHostToDevice:
            alloc.data[doff : doff + count] = harray[hoff : hoff + count]
            alloc.fresh = max(alloc.fresh, doff + count)
        else:
            harray[hoff : hoff + count] = alloc.data[doff : doff + count]

    return (STATE.enqueue(int(stream), copy),)


def cudaStreamSynchronize(stream: Any) -> tuple[Any, ...]:
    if (refused := _blocked()) is not None:
        return refused
    fake = STATE.live_stream(int(stream))
    if fake is None:
        return _fail(cudaError_t.cudaErrorInvalidResourceHandle, f"stream {int(stream):#x}")
    work, fake.pending = fake.pending, []
    fake.synchronizations += 1
    STATE.synchronizations += 1
    for item in work:
        try:
            item()
        except DeviceFault as fault:
            STATE.fault(fake.device, fault.code)
            return _fail(fault.code, str(fault))
    return _ok()


# IPC memory handles live in their own module; imported last (it reads STATE at call time).
from tests.fakes import cuda_ipc  # noqa: E402
from tests.fakes.cuda_ipc import (  # noqa: E402, F401
    CUDA_IPC_HANDLE_SIZE,
    cudaIpcCloseMemHandle,
    cudaIpcGetMemHandle,
    cudaIpcMemHandle_t,
    cudaIpcMemLazyEnablePeerAccess,
    cudaIpcOpenMemHandle,
)
