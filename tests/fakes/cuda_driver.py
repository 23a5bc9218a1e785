"""TEST DOUBLE of ``cuda.bindings.driver`` (cuda-python 13): only ``cuMemGetAddressRange``.

It answers from the fake runtime's bookkeeping (``tests/fakes/cuda_runtime.py``): the base and
size of the ``cudaMalloc`` allocation or the IPC mapping of the calling (simulated) process that
holds a pointer; any other pointer is ``CUDA_ERROR_NOT_FOUND``, as the real driver answers.
"""

from __future__ import annotations

import enum
from typing import Any

from tests.fakes import cuda_ipc, cuda_runtime

IS_TEST_DOUBLE = True


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_NOT_FOUND = 500


MESSAGES = {
    0: "no error",
    1: "invalid argument",
    201: "invalid device context",
    500: "named symbol not found",
}


class CUdeviceptr:
    """A device address; ``int(ptr)`` is the address, as in cuda-python."""

    __slots__ = ("_ptr",)

    def __init__(self, ptr: int = 0) -> None:
        self._ptr = int(ptr)

    def __int__(self) -> int:
        return self._ptr

    def getPtr(self) -> int:
        return self._ptr


def cuGetErrorName(error: Any) -> tuple[Any, bytes]:
    return CUresult.CUDA_SUCCESS, CUresult(int(error)).name.encode()


def cuGetErrorString(error: Any) -> tuple[Any, bytes]:
    return CUresult.CUDA_SUCCESS, MESSAGES.get(int(error), "unknown error").encode()


def cuMemGetAddressRange(dptr: Any) -> tuple[Any, ...]:
    if cuda_runtime.STATE.blocked() is not None:
        return CUresult.CUDA_ERROR_INVALID_CONTEXT, None, None
    with cuda_runtime.STATE.lock:
        found = cuda_runtime.STATE.ipc.range_of(int(dptr))
    if found is None:
        process = cuda_ipc.current_process()
        cuda_runtime.STATE.last_error_detail = f"{int(dptr):#x} is no allocation of {process}"
        return CUresult.CUDA_ERROR_NOT_FOUND, None, None
    base, size = found
    return CUresult.CUDA_SUCCESS, CUdeviceptr(base), size
