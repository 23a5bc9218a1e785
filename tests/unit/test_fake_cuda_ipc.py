"""The fake CUDA IPC handles (TEST DOUBLE, tests/fakes/cuda_ipc.py) are as strict as real CUDA:
each rule the CUDA shared memory server relies on is checked here, with the error code."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.fakes.cuda_ipc import other_process
from tests.fakes.install import FakeGpu, installed_fakes
from trtpipe import cuda, cuda_ipc
from trtpipe.errors import RunnerError


@pytest.fixture
def gpu() -> Iterator[FakeGpu]:
    with installed_fakes(device_count=2) as handle:
        yield handle


def export(nbytes: int, device: int = 0) -> tuple[int, bytes]:
    """A client-process allocation and its handle bytes."""
    with other_process("client"):
        cuda.set_device(device)
        ptr = cuda.DeviceBuffer(nbytes).ptr
        handle = cuda.check(cuda.cudart().cudaIpcGetMemHandle(ptr), "cudaIpcGetMemHandle")
        return ptr, bytes((ctypes.c_char * 64).from_address(handle.getPtr()))


def code(result: Any) -> str:
    return cuda.cudart().cudaError_t(int(result[0])).name


def handle_of(raw: bytes) -> Any:
    handle = cuda.cudart().cudaIpcMemHandle_t()
    ctypes.memmove(handle.getPtr(), raw, 64)
    return handle


def test_open_maps_the_same_bytes_and_close_releases(gpu: FakeGpu) -> None:
    base, raw = export(256)
    assert len(raw) == 64 and raw != bytes(64)
    with other_process("client"):  # the exporter writes; the importer reads the same bytes
        stream, pinned = cuda.Stream(), cuda.PinnedHostBuffer(np.uint8, (256,))
        pinned.array[:] = np.arange(256, dtype=np.uint8)
        cuda.memcpy_htod_async(base, pinned.ptr, 256, stream)
        stream.synchronize()
        stream.close()
        pinned.close()
    mapped = cuda_ipc.open_mem_handle(raw, 0)
    assert mapped != base  # another process's address for the same memory
    assert cuda_ipc.bytes_from(mapped) == 256 and cuda_ipc.bytes_from(mapped + 100) == 156
    stream, pinned = cuda.Stream(), cuda.PinnedHostBuffer(np.uint8, (16,))
    cuda.memcpy_dtoh_async(pinned.ptr, mapped + 16, 16, stream)
    stream.synchronize()
    np.testing.assert_array_equal(pinned.array, np.arange(16, 32))
    stream.close()
    pinned.close()
    assert gpu.leaks()["device"] == 2  # the allocation and the mapping
    cuda_ipc.close_mem_handle(mapped, 0)
    assert gpu.state.ipc.mappings == {}
    with pytest.raises(RunnerError, match="cudaErrorInvalidValue"):  # closed already
        cuda_ipc.close_mem_handle(mapped, 0)


def test_open_twice_counts_references(gpu: FakeGpu) -> None:
    _, raw = export(64)
    first, second = cuda_ipc.open_mem_handle(raw, 0), cuda_ipc.open_mem_handle(raw, 0)
    assert first == second and gpu.state.ipc.mappings[first].references == 2
    cuda_ipc.close_mem_handle(first, 0)
    assert first in gpu.state.ipc.mappings
    cuda_ipc.close_mem_handle(first, 0)
    assert gpu.state.ipc.mappings == {}


def test_what_real_cuda_refuses(gpu: FakeGpu) -> None:
    runtime = cuda.cudart()
    base, raw = export(64, device=1)
    with other_process("client"):  # the exporting process: "invalid device context"
        cuda.set_device(1)
        result = runtime.cudaIpcOpenMemHandle(handle_of(raw), 1)
        assert code(result) == "cudaErrorDeviceUninitialized"
        interior = runtime.cudaIpcGetMemHandle(base + 8)  # not the base of an allocation
        assert code(interior) == "cudaErrorInvalidValue"
    assert code(runtime.cudaIpcGetMemHandle(base)) == "cudaErrorInvalidValue"  # not ours
    cuda.set_device(0)  # another device current: no peer access between fake devices
    assert code(runtime.cudaIpcOpenMemHandle(handle_of(raw), 1)) == (
        "cudaErrorPeerAccessUnsupported"
    )
    cuda.set_device(1)
    assert code(runtime.cudaIpcOpenMemHandle(handle_of(raw), 0)) == "cudaErrorInvalidValue"
    assert code(runtime.cudaIpcOpenMemHandle(handle_of(bytes(64)), 1)) == (
        "cudaErrorInvalidResourceHandle"
    )
    mapped = cuda_ipc.open_mem_handle(raw, 1)
    cuda.set_device(0)
    assert code(runtime.cudaIpcCloseMemHandle(mapped)) == "cudaErrorDeviceUninitialized"
    with other_process("client"):  # the exporter frees: the handle names nothing any more
        cuda.set_device(1)
        assert int(runtime.cudaFree(base)[0]) == 0
    with pytest.raises(RunnerError, match="cudaErrorInvalidResourceHandle"):
        cuda_ipc.open_mem_handle(raw, 1)
    stream, pinned = cuda.Stream(), cuda.PinnedHostBuffer(np.uint8, (8,))
    with pytest.raises(RunnerError, match="cudaErrorInvalidDevicePointer"):  # read after free
        cuda.memcpy_dtoh_async(pinned.ptr, mapped, 8, stream)
    stream.close()
    pinned.close()
    cuda_ipc.close_mem_handle(mapped, 1)
    assert gpu.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_address_range_of_unknown_pointer(gpu: FakeGpu) -> None:
    with pytest.raises(RunnerError, match="CUDA_ERROR_NOT_FOUND"):
        cuda_ipc.bytes_from(0x1234)
    base, _ = export(64)
    with pytest.raises(RunnerError, match="CUDA_ERROR_NOT_FOUND"):  # another process's address
        cuda_ipc.bytes_from(base)
