"""TEST DOUBLE: the engine and execution context of the fake ``tensorrt`` module.

The engine runs the embedded ONNX graph with ONNX Runtime (CPU) when the fake CUDA stream it
was launched on is synchronized; inputs are read from, and outputs written to, fake device
memory at the tensor addresses given, so every copy the runner forgets shows up as wrong data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.fakes import cuda_runtime
from tests.fakes import tensorrt as trt
from tests.fakes.cuda_runtime import DeviceFault, cudaError_t

ALIGNMENT = 256  # TensorRT 10+ requires 256-byte aligned tensor addresses


class ICudaEngine:
    __slots__ = ("_header", "_io", "_logger", "_onnx", "_session")

    def __init__(self, header: dict[str, Any], onnx_bytes: bytes, logger: trt.ILogger) -> None:
        self._header, self._onnx, self._logger = header, onnx_bytes, logger
        self._io = {t["name"]: t for t in header["io"]}
        self._session: Any = None

    num_io_tensors = property(lambda self: len(self._header["io"]))
    num_optimization_profiles = property(lambda self: 1)
    device_memory_size_v2 = property(lambda self: 1 << 20)

    def _tensor(self, name: str) -> dict[str, Any]:
        if name not in self._io:
            raise KeyError(f"fake TensorRT: no tensor named {name!r}")
        return self._io[name]

    def get_tensor_name(self, index: int) -> str:
        return str(self._header["io"][index]["name"])

    def get_tensor_mode(self, name: str) -> trt.TensorIOMode:
        tensor = self._io.get(name)
        return trt.TensorIOMode(tensor["mode"]) if tensor else trt.TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> trt.DataType:
        return trt.DataType(self._tensor(name)["dtype"])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name)["shape"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        if profile_index != 0 or self.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
            raise ValueError(f"fake TensorRT: no profile shape for {name!r}/{profile_index}")
        return [tuple(s) for s in self._header["profile"][name]]

    def create_execution_context(self) -> IExecutionContext:
        return IExecutionContext(self)

    def serialize(self) -> trt.IHostMemory:
        raise NotImplementedError("not used by trtpipe")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        if self._session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            self._session = ort.InferenceSession(
                self._onnx, options, providers=["CPUExecutionProvider"]
            )
        names = [t["name"] for t in self._header["io"] if t["mode"] == trt.TensorIOMode.OUTPUT]
        return dict(zip(names, self._session.run(names, feeds), strict=True))


class IExecutionContext:
    __slots__ = ("_addresses", "_engine", "_profile_set", "_shapes")

    def __init__(self, engine: ICudaEngine) -> None:
        self._engine = engine
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._profile_set = False

    engine = property(lambda self: self._engine)

    def _error(self, message: str) -> bool:
        self._engine._logger.log(trt.ILogger.ERROR, message)
        return False

    def _inputs(self) -> list[dict[str, Any]]:
        return [t for t in self._engine._header["io"] if t["mode"] == trt.TensorIOMode.INPUT]

    def set_optimization_profile_async(self, profile_index: int, stream: int) -> bool:
        """Raises RuntimeError on failure, as the real binding does (it never returns False)."""
        if profile_index != 0:
            self._error(f"profile {profile_index} does not exist")
            raise RuntimeError("Error in set optimization profile.")
        if cuda_runtime.STATE.live_stream(int(stream)) is None:
            self._error("set_optimization_profile_async needs a live, non-default stream")
            raise RuntimeError("Error in set optimization profile.")
        self._profile_set, self._shapes = True, {}
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        tensor = self._engine._io.get(name)
        if tensor is None or tensor["mode"] != trt.TensorIOMode.INPUT:
            return self._error(f"{name!r} is not an input tensor")
        if not self._profile_set:
            return self._error("call set_optimization_profile_async before set_input_shape")
        dims = tuple(int(d) for d in shape)
        low, _, high = self._engine._header["profile"][name]
        if len(dims) != len(low) or not all(
            a <= d <= b for a, d, b in zip(low, dims, high, strict=True)
        ):
            return self._error(f"{name}: shape {dims} outside the profile [{low}, {high}]")
        self._shapes[name] = dims
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        tensor = self._engine._tensor(name)
        if tensor["mode"] == trt.TensorIOMode.INPUT:
            return self._shapes.get(name, tuple(tensor["shape"]))
        known: dict[str, int] = {}
        for spec in self._inputs():
            if spec["name"] not in self._shapes:
                return tuple(-1 if d < 0 else d for d in tensor["shape"])
            for dim, size in zip(spec["dims"], self._shapes[spec["name"]], strict=True):
                if dim:
                    known[dim] = size
        return tuple(
            d if d >= 0 else known.get(p, -1)
            for d, p in zip(tensor["shape"], tensor["dims"], strict=True)
        )

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self._engine._io:
            return self._error(f"set_tensor_address: no tensor {name!r}")
        if int(memory) == 0 or int(memory) % ALIGNMENT:
            return self._error(
                f"set_tensor_address({name!r}): address {int(memory):#x} is null or not "
                f"{ALIGNMENT}-byte aligned"
            )
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        state = cuda_runtime.STATE
        if int(stream_handle) == 0:
            return self._error("execute_async_v3 on the default stream (0) is not allowed")
        if state.live_stream(int(stream_handle)) is None:
            return self._error(f"execute_async_v3: stream {int(stream_handle):#x} is not live")
        if not self._profile_set:
            return self._error("no optimization profile selected")
        missing = [t["name"] for t in self._inputs() if t["name"] not in self._shapes]
        if missing:
            return self._error(f"input shapes not set for {missing}")
        plan = []
        for tensor in self._engine._header["io"]:
            name = tensor["name"]
            if name not in self._addresses:
                return self._error(f"tensor {name!r} has no address (set_tensor_address)")
            shape = self.get_tensor_shape(name)
            dtype = np.dtype(trt.nptype(trt.DataType(tensor["dtype"])))
            need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            found = state.find_device(self._addresses[name], max(need, 1))
            if found is None:
                return self._error(f"tensor {name!r}: address is not {need} bytes of device memory")
            plan.append((tensor, shape, dtype, need, *found))
        engine = self._engine
        device = state.current_device()

        def launch() -> None:
            for tensor, _, _, _, alloc, _ in plan:
                if alloc.device != device:
                    raise DeviceFault(
                        cudaError_t.cudaErrorIllegalAddress,
                        f"tensor {tensor['name']!r} lives on device {alloc.device}, the engine "
                        f"runs on device {device}",
                    )
            feeds = {}
            for tensor, shape, dtype, need, alloc, offset in plan:
                if tensor["mode"] != trt.TensorIOMode.INPUT:
                    continue
                if alloc.fresh < offset + need:
                    raise DeviceFault(
                        cudaError_t.cudaErrorLaunchFailure,
                        f"input {tensor['name']!r}: only {max(alloc.fresh - offset, 0)} of {need} "
                        "bytes were copied to the device for this launch (dtype or shape mismatch)",
                    )
                raw = alloc.data[offset : offset + need]
                feeds[tensor["name"]] = raw.view(dtype).reshape(shape).copy()
                alloc.fresh = 0
            results = engine.run(feeds)
            for tensor, shape, dtype, need, alloc, offset in plan:
                if tensor["mode"] == trt.TensorIOMode.OUTPUT:
                    value = np.ascontiguousarray(results[tensor["name"]], dtype=dtype)
                    if tuple(value.shape) != tuple(shape):
                        raise DeviceFault(
                            cudaError_t.cudaErrorIllegalAddress,
                            f"{tensor['name']}: {value.shape} != {shape}",
                        )
                    alloc.data[offset : offset + need] = value.reshape(-1).view(np.uint8)
                    # Data a launch wrote on the device is valid input for the next launch
                    # (a KV cache kept on the GPU), as if it had been copied there.
                    alloc.fresh = max(alloc.fresh, offset + need)

        code = state.enqueue(int(stream_handle), launch)
        if code != cudaError_t.cudaSuccess:
            return self._error(f"launch failed: {cudaError_t(code).name} {state.last_error_detail}")
        trt.STATS["launches"] += 1
        return True
