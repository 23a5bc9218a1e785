"""TensorRT runner: one engine on one GPU, one execution context, one stream.

Device buffers and pinned host buffers are sized once for the profile maximum and reused.
A batch is: copy feeds into pinned memory, async host->device, set input shapes and tensor
addresses, ``execute_async_v3``, async device->host, one synchronize. All CUDA work of a call
happens on the calling thread (``set_device`` first), so a worker thread per GPU can own it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import EngineMismatchError, InputError, RunnerError
from trtpipe.runners.base import ManifestRunner

log = logging.getLogger(__name__)


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
        if not self._context.set_optimization_profile_async(0, self._stream.handle):
            raise RunnerError("could not select optimization profile 0")
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

    def _allocate(self, cuda: Any) -> None:
        """Buffers for the profile maximum: set max input shapes, read max output shapes."""
        engine, context = self._engine, self._context
        for name in self._input_names:
            max_shape = tuple(int(d) for d in engine.get_tensor_profile_shape(name, 0)[2])
            if not context.set_input_shape(name, max_shape):
                raise RunnerError(f"engine rejects its own profile maximum {max_shape} for {name}")
            self._add_buffers(cuda, name, max_shape)
        for name in self._output_names:
            max_shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in max_shape):
                raise RunnerError(
                    f"output {name!r} has a data-dependent shape {list(max_shape)}; not supported"
                )
            self._add_buffers(cuda, name, max_shape)

    def _add_buffers(self, cuda: Any, name: str, max_shape: tuple[int, ...]) -> None:
        dtype = np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))
        host = cuda.PinnedHostBuffer(dtype, max_shape)
        self._host_buffers[name] = host
        self._device_buffers[name] = cuda.DeviceBuffer(host.nbytes)

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
                if not context.set_tensor_address(name, device.ptr):
                    raise RunnerError(f"TensorRT rejected the address of tensor {name!r}")
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
