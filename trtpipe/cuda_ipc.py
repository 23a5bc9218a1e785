"""CUDA IPC memory handles: device memory another process exported with ``cudaIpcGetMemHandle``.

What the CUDA shared memory extension of the server needs: open a 64-byte handle on the device
it names, learn how large the mapped allocation really is (so a client cannot register more
than it owns and have the server read past it), and close the mapping again. The handle is
opened with the device current, as CUDA requires, and closed the same way.

cuda-python is looked up on every call, as in :mod:`trtpipe.cuda`, so importing this module
needs no GPU.
"""

from __future__ import annotations

import ctypes
from typing import Any

from trtpipe.cuda import check, cudart, set_device
from trtpipe.errors import BackendUnavailableError, RunnerError

HANDLE_SIZE = 64  # CUDA_IPC_HANDLE_SIZE


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        raise BackendUnavailableError(
            "cuda-python is not installed; install it with pip install 'trtpipe[gpu]'"
        ) from exc
    return driver


def open_mem_handle(raw: bytes, device: int) -> int:
    """Map the allocation ``raw`` names into this process on ``device``; its device address."""
    if len(raw) != HANDLE_SIZE:
        raise RunnerError(f"a CUDA IPC handle is {HANDLE_SIZE} bytes, got {len(raw)}")
    runtime = cudart()
    set_device(device)
    handle = runtime.cudaIpcMemHandle_t()
    ctypes.memmove(handle.getPtr(), raw, HANDLE_SIZE)
    flags = runtime.cudaIpcMemLazyEnablePeerAccess
    return int(check(runtime.cudaIpcOpenMemHandle(handle, flags), "cudaIpcOpenMemHandle"))


def close_mem_handle(ptr: int, device: int) -> None:
    set_device(device)
    check(cudart().cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")


def bytes_from(ptr: int) -> int:
    """Bytes of device memory from ``ptr`` to the end of the allocation holding it.

    ``cuMemGetAddressRange`` (driver API): the runtime API has no such query. The device that
    owns ``ptr`` must be current (the caller has just opened it there).
    """
    driver = _driver()
    err, base, size = driver.cuMemGetAddressRange(ptr)
    if int(err) != 0:
        try:
            name = driver.cuGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # an unknown code: its number says enough
            name = f"CUresult {int(err)}"
        raise RunnerError(f"cuMemGetAddressRange({ptr:#x}) failed: {name}")
    return int(base) + int(size) - ptr
