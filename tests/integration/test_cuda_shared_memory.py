"""CUDA shared memory with tritonclient, in the spirit of Triton's simple_http_cudashm_client /
simple_grpc_cudashm_client, on the strict fake CUDA runtime (TEST DOUBLE: no GPU is involved;
``tests/fakes/cuda_ipc.py``). The client side is a simulated second process of the fake: its
device buffers are exported with ``cudaIpcGetMemHandle`` and the server opens the handles, as
across real processes. Checks: outputs equal a plain infer, status lists the regions, a tensor
or region outside what was registered (or allocated) is a 400, unregister closes the mapping
(the fake's leak counter comes back to zero), and without a GPU registering is a clear 400."""

from __future__ import annotations

import base64
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.fakes.cuda_ipc import other_process
from tests.fakes.install import FakeGpu, installed_fakes
from tests.server_utils import fetch
from tests.tensor_models import save_add_sub
from trtpipe import cuda
from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.devices import Device
from trtpipe.server.app import InferenceServer, ServerConfig, ServerThread
from trtpipe.server.config import ServeConfig
from trtpipe.server.repository import ModelRepository
from trtpipe.server.shared_memory import SystemSharedMemory

MODEL = "simple"
ROWS, WIDTH = 1, 16
BYTES = ROWS * WIDTH * 4  # int32
NO_LEAKS = {"device": 0, "host": 0, "streams": 0}


class ClientBuffer:
    """Device memory of the client process, made and filled as tritonclient's
    ``cuda_shared_memory`` does (cudaMalloc, cudaIpcGetMemHandle, copies on its own stream)."""

    def __init__(self, nbytes: int, device: int = 0) -> None:
        self.nbytes, self.device = nbytes, device
        with other_process("client"):
            cuda.set_device(device)
            self.memory = cuda.DeviceBuffer(nbytes)
            handle = cuda.check(cuda.cudart().cudaIpcGetMemHandle(self.memory.ptr), "get handle")
            self.raw = bytes((ctypes.c_char * 64).from_address(handle.getPtr()))

    @property
    def b64(self) -> bytes:
        """What ``tritonclient.utils.cuda_shared_memory.get_raw_handle`` returns."""
        return base64.b64encode(self.raw)

    def _copy(self, host: np.ndarray, offset: int, to_device: bool) -> None:
        with other_process("client"):
            cuda.set_device(self.device)
            stream, pinned = cuda.Stream(), cuda.PinnedHostBuffer(np.uint8, (host.nbytes,))
            try:
                if to_device:
                    pinned.array[:] = host.reshape(-1).view(np.uint8)
                    cuda.memcpy_htod_async(
                        self.memory.ptr + offset, pinned.ptr, host.nbytes, stream
                    )
                else:
                    cuda.memcpy_dtoh_async(
                        pinned.ptr, self.memory.ptr + offset, host.nbytes, stream
                    )
                stream.synchronize()
                if not to_device:
                    host.reshape(-1).view(np.uint8)[:] = pinned.array
            finally:
                pinned.close()
                stream.close()

    def write(self, array: np.ndarray, offset: int = 0) -> None:
        self._copy(np.ascontiguousarray(array), offset, to_device=True)

    def read(self, dtype: Any, shape: list[int], offset: int = 0) -> np.ndarray:
        out = np.empty(shape, dtype)
        self._copy(out, offset, to_device=False)
        return out

    def free(self) -> None:
        with other_process("client"):
            cuda.set_device(self.device)
            self.memory.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cudashm")
    onnx_path = save_add_sub(root / "src" / "simple.onnx", WIDTH)
    build_engine_dir(BuildConfig(onnx_path=onnx_path, output=root / MODEL))
    return root / MODEL


@pytest.fixture(scope="module")
def gpu() -> Iterator[FakeGpu]:
    with installed_fakes() as handle:
        yield handle


def start(engine: Path, allow: bool) -> ServerThread:
    config = ServeConfig(devices=[Device("cpu", 0)], warmup=False)
    repository = ModelRepository.from_specs([str(engine)], config)
    if allow:
        repository.shared_memory = SystemSharedMemory()
    server = InferenceServer(repository, ServerConfig(http_port=0, grpc_port=0))
    return ServerThread(server).start()


@pytest.fixture(scope="module")
def server(engine: Path, gpu: FakeGpu) -> Iterator[ServerThread]:
    thread = start(engine, allow=True)
    yield thread
    thread.stop()
    assert gpu.state.ipc.mappings == {}  # shutdown closes every mapping


def client_for(server: ServerThread, module: Any) -> Any:
    port = server.server.http_port if module is httpclient else server.server.grpc_port
    client = module.InferenceServerClient(f"127.0.0.1:{port}")
    client.unregister_cuda_shared_memory()
    return client


def cuda_status(client: Any) -> list[dict[str, Any]]:
    status = client.get_cuda_shared_memory_status()
    if isinstance(status, list):
        return sorted(status, key=lambda r: r["name"])
    return [
        {"name": r.name, "device_id": r.device_id, "byte_size": r.byte_size}
        for _, r in sorted(status.regions.items())
    ]


def tensors(
    module: Any, in_region: str, out_region: str, second_offset: int = BYTES
) -> tuple[list[Any], list[Any]]:
    """INPUT0/INPUT1 and OUTPUT0/OUTPUT1, two per region, as Triton's cudashm examples do
    (``second_offset``: where INPUT1 is read; tritonclient never sends an offset of 0, so a
    tensor moved back to offset 0 needs a new InferInput)."""
    inputs = [module.InferInput(f"INPUT{i}", [ROWS, WIDTH], "INT32") for i in range(2)]
    inputs[0].set_shared_memory(in_region, BYTES)
    inputs[1].set_shared_memory(in_region, BYTES, offset=second_offset)
    extra = {"binary_data": True} if module is httpclient else {}
    outputs = [module.InferRequestedOutput(f"OUTPUT{i}", **extra) for i in range(2)]
    outputs[0].set_shared_memory(out_region, BYTES)
    outputs[1].set_shared_memory(out_region, BYTES, offset=BYTES)
    return inputs, outputs


def placement(output: Any) -> tuple[str, int, int]:
    """(region, byte size, offset) a response gives for an output written to shared memory."""
    if isinstance(output, dict):  # HTTP
        assert "data" not in output
        params = output["parameters"]
    else:
        params = {k: v.WhichOneof("parameter_choice") for k, v in output.parameters.items()}
        params = {k: getattr(output.parameters[k], v) for k, v in params.items()}
    return (
        params["shared_memory_region"],
        params["shared_memory_byte_size"],
        params.get("shared_memory_offset", 0),
    )


def refused(module: Any, call: Any, message: str) -> None:
    with pytest.raises(InferenceServerException, match=message) as error:
        call()
    expected = "StatusCode.INVALID_ARGUMENT" if module is grpcclient else "400"
    assert error.value.status() == expected


@pytest.fixture
def inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(14)
    return tuple(rng.integers(-1000, 1000, (ROWS, WIDTH), dtype=np.int32) for _ in range(2))


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_inputs_and_outputs_through_cuda_shared_memory(
    server: ServerThread, gpu: FakeGpu, module: Any, inputs: tuple[np.ndarray, np.ndarray]
) -> None:
    client = client_for(server, module)
    input0, input1 = inputs
    in_buffer, out_buffer = ClientBuffer(2 * BYTES), ClientBuffer(2 * BYTES)
    in_buffer.write(input0)
    in_buffer.write(input1, offset=BYTES)
    client.register_cuda_shared_memory("input_data", in_buffer.b64, 0, 2 * BYTES)
    client.register_cuda_shared_memory("output_data", out_buffer.b64, 0, 2 * BYTES)
    assert cuda_status(client) == [
        {"name": "input_data", "device_id": 0, "byte_size": 2 * BYTES},
        {"name": "output_data", "device_id": 0, "byte_size": 2 * BYTES},
    ]
    assert len(gpu.state.ipc.mappings) == 2  # opened in the server process
    system = client.get_system_shared_memory_status()  # the kinds are listed apart
    assert (system if module is httpclient else list(system.regions)) == []

    shm_inputs, shm_outputs = tensors(module, "input_data", "output_data")
    result = client.infer(MODEL, shm_inputs, outputs=shm_outputs)
    for name, offset in (("OUTPUT0", 0), ("OUTPUT1", BYTES)):  # in the region, not the reply
        assert placement(result.get_output(name)) == ("output_data", BYTES, offset)
    got0 = out_buffer.read(np.int32, [ROWS, WIDTH])
    got1 = out_buffer.read(np.int32, [ROWS, WIDTH], offset=BYTES)

    plain_inputs = [module.InferInput(f"INPUT{i}", [ROWS, WIDTH], "INT32") for i in range(2)]
    plain_inputs[0].set_data_from_numpy(input0)
    plain_inputs[1].set_data_from_numpy(input1)
    plain = client.infer(MODEL, plain_inputs)
    np.testing.assert_array_equal(got0, plain.as_numpy("OUTPUT0"))
    np.testing.assert_array_equal(got1, plain.as_numpy("OUTPUT1"))
    np.testing.assert_array_equal(got0, input0 + input1)
    np.testing.assert_array_equal(got1, input0 - input1)

    client.unregister_cuda_shared_memory("input_data")
    assert [r["name"] for r in cuda_status(client)] == ["output_data"]
    assert len(gpu.state.ipc.mappings) == 1
    client.unregister_cuda_shared_memory()
    assert cuda_status(client) == [] and gpu.state.ipc.mappings == {}
    in_buffer.free()
    out_buffer.free()
    assert gpu.leaks() == NO_LEAKS  # mappings, staging buffers and streams all released


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_cuda_regions_are_confined(server: ServerThread, gpu: FakeGpu, module: Any) -> None:
    client = client_for(server, module)
    buffer, out_buffer = ClientBuffer(2 * BYTES), ClientBuffer(2 * BYTES)
    register = client.register_cuda_shared_memory

    # Never mapped: more than the handle's allocation, bytes that name nothing, a handle of the
    # wrong size, a device that does not exist, a handle of memory the client freed.
    refused(module, lambda: register("big", buffer.b64, 0, 2 * BYTES + 1), "past the end of the")
    junk = base64.b64encode(os.urandom(64))
    refused(module, lambda: register("junk", junk, 0, 16), "cudaErrorInvalidResourceHandle")
    short = base64.b64encode(buffer.raw[:10])
    refused(module, lambda: register("short", short, 0, 16), "must be the 64 bytes")
    refused(module, lambda: register("dev1", buffer.b64, 1, 16), "device_id 1 does not exist")
    freed = ClientBuffer(BYTES)
    freed.free()
    refused(module, lambda: register("freed", freed.b64, 0, 16), "cudaErrorInvalidResourceHandle")
    assert gpu.state.ipc.mappings == {}  # a refused registration leaves nothing open

    # Registered for half its allocation: the other half is out of reach, though allocated.
    register("input_data", buffer.b64, 0, BYTES)
    register("output_data", out_buffer.b64, 0, 2 * BYTES)
    refused(module, lambda: register("input_data", buffer.b64, 0, 8), "already registered")
    inputs, outputs = tensors(module, "input_data", "output_data")
    refused(module, lambda: client.infer(MODEL, inputs, outputs=outputs), "run past the end")
    inputs, _ = tensors(module, "input_data", "output_data", second_offset=0)
    client.infer(MODEL, inputs, outputs=outputs)  # both inputs from the first half: fine
    outputs[1].set_shared_memory("output_data", BYTES - 4, offset=BYTES)
    refused(module, lambda: client.infer(MODEL, inputs, outputs=outputs), "more than the")
    outputs[1].set_shared_memory("output_data", BYTES, offset=BYTES + 4)
    refused(module, lambda: client.infer(MODEL, inputs, outputs=outputs), "run past the end")

    # The same handle under a second name: CUDA hands back the same mapping, counted twice;
    # each unregister closes one reference and the other name keeps working.
    register("input_again", buffer.b64, 0, BYTES)
    assert len(gpu.state.ipc.mappings) == 2
    client.unregister_cuda_shared_memory("input_data")
    inputs, outputs = tensors(module, "input_again", "output_data", second_offset=0)
    outputs[1].set_shared_memory("output_data", BYTES, offset=BYTES)
    client.infer(MODEL, inputs, outputs=outputs)
    np.testing.assert_array_equal(out_buffer.read(np.int32, [ROWS, WIDTH], BYTES), 0)
    refused(module, lambda: client.get_cuda_shared_memory_status("input_data"), "unable to find")
    client.unregister_cuda_shared_memory()
    assert gpu.state.ipc.mappings == {}
    buffer.free()
    out_buffer.free()
    assert gpu.leaks() == NO_LEAKS
    assert client.is_server_ready()


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_without_a_gpu_registering_is_a_clear_400(
    server: ServerThread, gpu: FakeGpu, module: Any
) -> None:
    client = client_for(server, module)
    handle = base64.b64encode(bytes(64))
    gpu.state.device_count = 0
    try:
        refused(
            module,
            lambda: client.register_cuda_shared_memory("r", handle, 0, 16),
            "CUDA shared memory needs a GPU: cudaErrorNoDevice",
        )
    finally:
        gpu.state.device_count = 1
    gpu.state.driver_version = 12080  # cuda-python 13 on a CUDA 12 driver
    try:
        refused(
            module,
            lambda: client.register_cuda_shared_memory("r", handle, 0, 16),
            "CUDA shared memory needs a GPU: cudaErrorInsufficientDriver.*supports CUDA 12.8",
        )
    finally:
        gpu.state.driver_version = gpu.state.runtime_version
    assert cuda_status(client) == []


def test_cuda_shared_memory_is_off_by_default(engine: Path, gpu: FakeGpu) -> None:
    thread = start(engine, allow=False)
    try:
        port = thread.server.http_port
        assert port is not None
        status, raw = fetch(port, "/v2/cudasharedmemory/status")
        assert status == 400 and b"CUDA shared memory unless started with --allow-shared" in raw
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{thread.server.grpc_port}")
        with pytest.raises(InferenceServerException, match="CudaSharedMemoryRegister: ") as error:
            client.register_cuda_shared_memory("r", base64.b64encode(bytes(64)), 0, 16)
        assert error.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "--allow-shared-memory" in str(error.value)
    finally:
        thread.stop()
