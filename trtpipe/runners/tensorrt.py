"""TensorRT runner: one engine on one GPU, one execution context, one stream.

Buffers are allocated once at load and reused; :meth:`TensorRTRunner.buffer_plan` says how big
each is. The plain runner stages every input and output through pinned host memory, sized for
the profile maximum; subclasses (the decoder session's step runner) pin only what they stage,
since ``cudaHostAlloc`` locks physical RAM. A batch is: copy feeds into pinned memory, async
host->device, set input shapes and tensor addresses, ``execute_async_v3``, async device->host,
one synchronize. All CUDA work of a call happens on the calling thread (``set_device`` first),
so a worker thread per GPU can own it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import EngineMismatchError, InputError, RunnerError
from trtpipe.runners.base import ManifestRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BufferPlan:
    """One I/O tensor's buffers: device memory always, pinned host memory only if staged."""

    device_shape: tuple[int, ...]
    host_shape: tuple[int, ...] | None  # None: the tensor never passes through host memory


def major_minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


class TensorRTRunner(ManifestRunner):
    """Runs ``engine.plan`` from an engine dir built for the tensorrt backend."""

    backend = "tensorrt"

    def __init__(self, engine: EngineDir, device: Device):
        engine.expect_backend("tensorrt")
        if not device.is_gpu:
            raise InputError(f"TensorRT engines run on a CUDA device, not {device}; use cuda:0")
        super().__init__(engine.manifest, device)
        self.engine_dir = engine
        self._lock = threading.Lock()
        self._trt: Any = None
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._device_buffers: dict[str, Any] = {}
        self._host_buffers: dict[str, Any] = {}
        self._input_names: list[str] = []
        self._output_names: list[str] = []

    # -- load ------------------------------------------------------------------------------
    def check_compatible(self, trt_version: str, capability: str) -> None:
        """Refuse an engine built by another TensorRT version or for another GPU arch."""
        built_version = self.manifest.versions.get("tensorrt", "")
        if major_minor(built_version) != major_minor(trt_version):
            raise EngineMismatchError(
                f"{self.engine_dir.path} was built with TensorRT {built_version or '?'}, this "
                f"machine has {trt_version}; rebuild the engine here with trtpipe build"
            )
        built_cc = str(self.manifest.device.get("compute_capability", ""))
        if built_cc != capability:
            raise EngineMismatchError(
                f"{self.engine_dir.path} was built for GPU compute capability {built_cc or '?'}, "
                f"{self.device} has {capability}; rebuild the engine on this GPU type"
            )

    def load(self) -> None:
        from trtpipe import cuda
        from trtpipe.build.tensorrt import import_tensorrt

        trt = import_tensorrt()
        index = self.device.index
        cuda.set_device(index)
        self.check_compatible(str(trt.__version__), cuda.device_compute_capability(index))
        try:
            self._load(trt, cuda)
        except BaseException:
            self.close()
            raise
        self.loaded = True
        log.debug("loaded %s on %s", self.engine_dir.path, self.device)

    def _load(self, trt: Any, cuda: Any) -> None:
        from trtpipe.build.tensorrt import capturing_logger

        self._trt = trt
        # TensorRT keeps a pointer to the logger: it must live as long as the runtime.
        self._logger = logger = capturing_logger(trt)
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(
            self.engine_dir.engine_path.read_bytes()
        )
        if self._engine is None:
            details = "; ".join(logger.errors[-3:]) or "incompatible or corrupt plan"
            raise EngineMismatchError(
                f"TensorRT could not load {self.engine_dir.engine_path} ({details}); "
                "rebuild the engine on this machine"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RunnerError(f"could not create an execution context on {self.device}")
        self._stream = cuda.Stream()
        try:
            # The binding raises RuntimeError on failure (it never returns False).
            self._context.set_optimization_profile_async(0, self._stream.handle)
        except RuntimeError as exc:
            details = "; ".join(logger.errors[-3:]) or str(exc)
            raise RunnerError(
                f"TensorRT could not select optimization profile 0 on {self.device}: {details}"
            ) from exc
        self._read_io(trt)
        self._allocate(cuda)

    def _read_io(self, trt: Any) -> None:
        """I/O names and dtypes from the engine, checked against the manifest."""
        engine = self._engine
        specs = {s.name: s for s in (*self.manifest.inputs, *self.manifest.outputs)}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._input_names if is_input else self._output_names).append(name)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            spec = specs.get(name)
            if spec is None or np.dtype(spec.dtype) != dtype:
                raise EngineMismatchError(
                    f"engine tensor {name!r} ({dtype}) does not match the manifest "
                    f"({spec.dtype if spec else 'absent'}); rebuild the engine"
                )
        if sorted(self._input_names) != sorted(s.name for s in self.manifest.inputs):
            raise EngineMismatchError(
                f"engine inputs {self._input_names} differ from the manifest; rebuild the engine"
            )

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))

    def profile_max(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._engine.get_tensor_profile_shape(name, 0)[2])

    def buffer_plan(self) -> dict[str, BufferPlan]:
        """Every input and output staged through pinned memory, at the profile maximum.

        Output maxima come from the context with every input at its maximum.
        """
        plan: dict[str, BufferPlan] = {}
        for name in self._input_names:
            max_shape = self.profile_max(name)
            if not self._context.set_input_shape(name, max_shape):
                raise RunnerError(f"engine rejects its own profile maximum {max_shape} for {name}")
            plan[name] = BufferPlan(max_shape, max_shape)
        for name in self._output_names:
            max_shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            if any(d < 0 for d in max_shape):
                raise RunnerError(
                    f"output {name!r} has a data-dependent shape {list(max_shape)}; not supported"
                )
            plan[name] = BufferPlan(max_shape, max_shape)
        return plan

    def _allocate(self, cuda: Any) -> None:
        """Device buffers (256-byte aligned by cudaMalloc) and pinned buffers per the plan."""
        for name, plan in self.buffer_plan().items():
            dtype = self._dtype(name)
            nbytes = int(np.prod(plan.device_shape, dtype=np.int64)) * dtype.itemsize
            self._device_buffers[name] = cuda.DeviceBuffer(nbytes)
            if plan.host_shape is not None:
                self._host_buffers[name] = cuda.PinnedHostBuffer(dtype, plan.host_shape)
        memory = self.memory_bytes()
        log.info(
            "%s: %.1f MiB device buffers, %.1f MiB pinned host, %.1f MiB TensorRT activations",
            self.describe(),
            memory["device_buffers"] / 2**20,
            memory["pinned_host"] / 2**20,
            memory["activations"] / 2**20,
        )

    def memory_bytes(self) -> dict[str, int]:
        """What this runner holds: its device buffers, its pinned host buffers, and the
        execution context's activation memory (TensorRT allocates that itself)."""
        activations = int(getattr(self._engine, "device_memory_size_v2", 0) or 0)
        return {
            "device_buffers": sum(b.nbytes for b in self._device_buffers.values()),
            "pinned_host": sum(b.nbytes for b in self._host_buffers.values()),
            "activations": activations,
        }

    # -- infer -----------------------------------------------------------------------------
    def _upload_input(self, cuda: Any, name: str, array: np.ndarray) -> Any:
        """Pinned host copy, async host->device copy, input shape set; returns the buffer."""
        host = self._host_buffers[name].view(array.shape)
        np.copyto(host, array, casting="same_kind")
        device = self._device_buffers[name]
        cuda.memcpy_htod_async(device.ptr, self._host_buffers[name].ptr, host.nbytes, self._stream)
        if not self._context.set_input_shape(name, tuple(array.shape)):
            raise InputError(
                f"input {name!r} shape {list(array.shape)} is outside the engine's profile"
            )
        return device

    def _set_address(self, name: str, pointer: int) -> None:
        """TensorRT needs 256-byte aligned addresses (cudaMalloc bases always are)."""
        if pointer % 256:
            raise RunnerError(f"tensor {name!r} address {pointer:#x} is not 256-byte aligned")
        if not self._context.set_tensor_address(name, pointer):
            raise RunnerError(f"TensorRT rejected the address of tensor {name!r}")

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from trtpipe import cuda

        with self._lock:
            if self._context is None:
                raise RunnerError(f"{self.describe()} was closed")
            cuda.set_device(self.device.index)
            context, stream = self._context, self._stream
            for name in self._input_names:
                self._upload_input(cuda, name, feeds[name])
            for name, device in self._device_buffers.items():
                self._set_address(name, device.ptr)
            if not context.execute_async_v3(stream.handle):
                raise RunnerError(f"execute_async_v3 failed on {self.device}")
            views: dict[str, np.ndarray] = {}
            for name in self._output_names:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                host_buffer = self._host_buffers[name]
                view = host_buffer.view(shape)
                cuda.memcpy_dtoh_async(
                    host_buffer.ptr, self._device_buffers[name].ptr, view.nbytes, stream
                )
                views[name] = view
            stream.synchronize()
            return {name: view.copy() for name, view in views.items()}

    # -- close -----------------------------------------------------------------------------
    def close(self) -> None:
        """Free buffers, stream, context and engine (in that order); safe to call twice."""
        from trtpipe import cuda

        with self._lock:
            if self._stream is not None or self._device_buffers or self._host_buffers:
                try:
                    cuda.set_device(self.device.index)
                except Exception as exc:  # freeing must go on; report what failed
                    log.warning("set_device during close failed: %s", exc)
            for buffer in [*self._device_buffers.values(), *self._host_buffers.values()]:
                try:
                    buffer.close()
                except Exception as exc:
                    log.warning("freeing a buffer of %s failed: %s", self.describe(), exc)
            self._device_buffers.clear()
            self._host_buffers.clear()
            if self._stream is not None:
                try:
                    self._stream.close()
                except Exception as exc:
                    log.warning("destroying the stream of %s failed: %s", self.describe(), exc)
                self._stream = None
            self._context = None
            self._engine = None
            self._runtime = None
            self._logger = None
            self._input_names, self._output_names = [], []
        super().close()
