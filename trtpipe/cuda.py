"""Thin helpers over cuda-python (``cuda.bindings.runtime``, 12.6+) for the TensorRT path.

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
INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: driver older than the runtime, or none
NO_DEVICE_ERRORS = {
    34,  # cudaErrorStubLibrary: the driver loaded is a stub (toolkit without a driver)
    INSUFFICIENT_DRIVER,
    46,  # cudaErrorDevicesUnavailable: busy, exclusive-process or prohibited compute mode
    100,  # cudaErrorNoDevice
    101,  # cudaErrorInvalidDevice
    802,  # cudaErrorSystemNotReady: e.g. fabric manager not running on NVSwitch systems
    803,  # cudaErrorSystemDriverMismatch: display driver and CUDA driver versions differ
    804,  # cudaErrorCompatNotSupportedOnDevice: forward-compatibility package on unsupported HW
    999,  # cudaErrorUnknown (typical without a driver)
}
# The extra whose cuda-python matches a driver of this CUDA major (cuda-python links its runtime).
EXTRA_FOR_MAJOR = {12: "gpu-cu12", 13: "gpu-cu13"}


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
        hint = ""
        if code == INSUFFICIENT_DRIVER:
            hint = driver_mismatch_hint()
        elif code in NO_DEVICE_ERRORS:
            hint = " (is an NVIDIA GPU and driver present?)"
        raise cls(f"{call} failed: {error_text(err)}{hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cuda_version_text(version: int) -> str:
    """``12040`` -> ``"12.4"`` (CUDA's version integers are 1000 * major + 10 * minor)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_mismatch_hint() -> str:
    """For cudaErrorInsufficientDriver: which CUDA the driver and the runtime speak, and the fix.

    cuda-python links the CUDA runtime of its own major statically, so cuda-python 13 on a
    CUDA 12 driver fails every call with this code; a driver version of 0 means no driver.
    """
    runtime = cudart()
    try:
        err, driver = runtime.cudaDriverGetVersion()
        driver = int(driver) if int(err) == 0 else 0
        err, built = runtime.cudaRuntimeGetVersion()
        built = int(built) if int(err) == 0 else 0
    except Exception:  # an older binding without the calls: say what is known
        return " (the NVIDIA driver is older than the CUDA runtime cuda-python was built for)"
    if driver == 0:
        return " (no NVIDIA driver is installed; is an NVIDIA GPU and driver present?)"
    extra = EXTRA_FOR_MAJOR.get(driver // 1000)
    fix = (
        f"pip install 'trtpipe[{extra}]' for cuda-python and TensorRT built for CUDA "
        f"{driver // 1000}"
        if extra
        else "upgrade the NVIDIA driver"
    )
    return (
        f" (driver/runtime mismatch: the NVIDIA driver supports CUDA {cuda_version_text(driver)}, "
        f"the installed cuda-python needs CUDA {cuda_version_text(built)}; {fix}, or upgrade "
        "the driver)"
    )


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.split(b"\0", 1)[0].decode(errors="replace")
    return str(value)


def device_count() -> int:
    """Visible CUDA devices (0 without a driver)."""
    err, count = cudart().cudaGetDeviceCount()
    return int(count) if int(err) == 0 else 0


def unusable_reason() -> str | None:
    """Why no CUDA GPU can be used here, in words (None when one can).

    For messages that would otherwise only say "no GPU": a driver older than cuda-python's
    runtime is named as such, with the extra that fits the driver.
    """
    try:
        runtime = cudart()
    except BackendUnavailableError as exc:
        return str(exc)
    err, count = runtime.cudaGetDeviceCount()
    code = int(err)
    if code == 0:
        return None if int(count) > 0 else "no CUDA-capable device is detected"
    hint = driver_mismatch_hint() if code == INSUFFICIENT_DRIVER else ""
    return f"{error_text(err)}{hint}"


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
