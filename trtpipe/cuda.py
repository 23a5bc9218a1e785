"""Thin helpers over cuda-python 13 (``cuda.bindings.runtime``) for the TensorRT path.

Every cuda-python call returns ``(err, *values)``; :func:`check` turns that into the values or
an error naming the call. Streams are always created non-blocking (never the default stream)
and handed to TensorRT as plain integer handles. Host staging memory is pinned
(``cudaHostAlloc``) so asynchronous copies really are asynchronous; buffers are sized once for
the profile maximum and reused.

The cuda-python module is looked up on every call (a dict lookup in ``sys.modules``) rather
than cached at import, so importing this module never needs a GPU.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np

from trtpipe.errors import BackendUnavailableError, RunnerError, TrtpipeError

log = logging.getLogger(__name__)

# cudaError_t values that mean "there is no usable GPU/driver here" rather than a failed call.
NO_DEVICE_ERRORS = {
    35,  # cudaErrorInsufficientDriver
    100,  # cudaErrorNoDevice
    101,  # cudaErrorInvalidDevice
    999,  # cudaErrorUnknown (typical without a driver)
}


def cudart() -> Any:
    """The ``cuda.bindings.runtime`` module, or a clear error when cuda-python is missing."""
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise BackendUnavailableError(
            "cuda-python is not installed; install it with pip install 'trtpipe[gpu]' "
            "(needs an NVIDIA driver and GPU)"
        ) from exc
    return runtime


def error_text(err: Any) -> str:
    """``cudaErrorNoDevice (no CUDA-capable device is detected)`` for an error code."""
    runtime = cudart()
    name = string = ""
    try:
        name = _decode(runtime.cudaGetErrorName(err)[1])
        string = _decode(runtime.cudaGetErrorString(err)[1])
    except Exception:  # the code itself may be unknown to the bindings
        pass
    return f"{name or f'cuda error {int(err)}'} ({string})" if string else name or str(int(err))


def check(result: Any, call: str, error: type[TrtpipeError] = RunnerError) -> Any:
    """``(err, *values)`` -> ``None`` / the value / a tuple of values; raise on ``err != 0``.

    A missing driver or device raises BackendUnavailableError whatever ``error`` says.
    """
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    code = int(err)
    if code != 0:
        cls = BackendUnavailableError if code in NO_DEVICE_ERRORS else error
        hint = " (is an NVIDIA GPU and driver present?)" if code in NO_DEVICE_ERRORS else ""
        raise cls(f"{call} failed: {error_text(err)}{hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.split(b"\0", 1)[0].decode(errors="replace")
    return str(value)


def device_count() -> int:
    """Visible CUDA devices (0 without a driver)."""
    err, count = cudart().cudaGetDeviceCount()
    return int(count) if int(err) == 0 else 0


def set_device(index: int) -> None:
    """Make ``index`` current for the calling thread (CUDA's current device is per thread)."""
    check(cudart().cudaSetDevice(index), f"cudaSetDevice({index})", BackendUnavailableError)


def device_properties(index: int) -> Any:
    return check(
        cudart().cudaGetDeviceProperties(index),
        f"cudaGetDeviceProperties({index})",
        BackendUnavailableError,
    )


def device_compute_capability(index: int) -> str:
    """``"9.0"`` for an H100: the architecture TensorRT engines are tied to."""
    props = device_properties(index)
    return f"{int(props.major)}.{int(props.minor)}"


def device_name(index: int) -> str:
    return _decode(device_properties(index).name)


class Stream:
    """A non-blocking CUDA stream; ``handle`` is the integer TensorRT and memcpy take."""

    def __init__(self) -> None:
        runtime = cudart()
        self._stream: Any = check(
            runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking),
            "cudaStreamCreateWithFlags",
        )
        self.handle = int(self._stream)
        if self.handle == 0:
            raise RunnerError("cudaStreamCreateWithFlags returned the default stream")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle:
            handle, self.handle = self.handle, 0
            check(cudart().cudaStreamDestroy(handle), "cudaStreamDestroy")


class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc); ``ptr`` is the device address as an int."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        # cudaMalloc(0) may return a null pointer that TensorRT rejects: allocate at least 1.
        self.ptr = int(check(cudart().cudaMalloc(max(self.nbytes, 1)), "cudaMalloc"))

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(cudart().cudaFree(ptr), "cudaFree")


class PinnedHostBuffer:
    """Page-locked host memory viewed as a flat numpy array of ``dtype``, sized for ``shape``.

    ``view(shape)`` gives a reshaped prefix for a smaller batch without copying.
    """

    def __init__(self, dtype: Any, max_shape: tuple[int, ...] | list[int]) -> None:
        runtime = cudart()
        self.dtype = np.dtype(dtype)
        self.max_shape = tuple(int(d) for d in max_shape)
        self.size = int(np.prod(self.max_shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize
        self.ptr = int(
            check(
                runtime.cudaHostAlloc(max(self.nbytes, 1), runtime.cudaHostAllocDefault),
                "cudaHostAlloc",
            )
        )
        raw = (ctypes.c_char * max(self.nbytes, 1)).from_address(self.ptr)
        self.array: np.ndarray = np.frombuffer(raw, dtype=self.dtype, count=self.size)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        if count > self.size:
            raise RunnerError(
                f"shape {list(shape)} needs {count} elements, the buffer holds {self.size}"
            )
        return self.array[:count].reshape(shape)

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.array = np.empty(0, dtype=self.dtype)
            check(cudart().cudaFreeHost(ptr), "cudaFreeHost")


def memcpy_htod_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    runtime = cudart()
    check(
        runtime.cudaMemcpyAsync(
            dst, src, nbytes, runtime.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle
        ),
        "cudaMemcpyAsync(host to device)",
    )


def memcpy_dtoh_async(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    runtime = cudart()
    check(
        runtime.cudaMemcpyAsync(
            dst, src, nbytes, runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle
        ),
        "cudaMemcpyAsync(device to host)",
    )
