"""System shared memory with tritonclient, in the spirit of Triton's simple_http_shm_client /
simple_grpc_shm_client: inputs and outputs through POSIX shm regions, and the confinement rules
(a region or tensor outside what was registered is a 400, never a read or write outside it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from tests.server_utils import fetch
from tests.tensor_models import save_add_sub
from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.devices import Device
from trtpipe.server.app import InferenceServer, ServerConfig, ServerThread
from trtpipe.server.config import ServeConfig
from trtpipe.server.repository import ModelRepository
from trtpipe.server.shared_memory import SystemSharedMemory

MODEL = "simple"
ROWS, WIDTH = 1, 16
BYTES = ROWS * WIDTH * 4  # int32
KEY = f"trtpipe_test_{os.getpid()}"  # shm names are machine-wide: keep them per process


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shm")
    onnx_path = save_add_sub(root / "src" / "simple.onnx", WIDTH)
    build_engine_dir(BuildConfig(onnx_path=onnx_path, output=root / MODEL))
    return root / MODEL


def start(engine: Path, allow: bool) -> ServerThread:
    config = ServeConfig(devices=[Device("cpu", 0)], warmup=False)
    repository = ModelRepository.from_specs([str(engine)], config)
    if allow:
        repository.shared_memory = SystemSharedMemory()
    server = InferenceServer(repository, ServerConfig(http_port=0, grpc_port=0))
    return ServerThread(server).start()


@pytest.fixture(scope="module")
def server(engine: Path) -> Iterator[ServerThread]:
    thread = start(engine, allow=True)
    yield thread
    thread.stop()


@pytest.fixture
def regions() -> Iterator[tuple[Any, Any, np.ndarray, np.ndarray]]:
    """An input region holding INPUT0 then INPUT1, and an empty output region (2 tensors each)."""
    input0 = np.arange(WIDTH, dtype=np.int32).reshape(ROWS, WIDTH)
    input1 = np.full((ROWS, WIDTH), 3, dtype=np.int32)
    out_handle = shm.create_shared_memory_region("output_data", f"/{KEY}_out", BYTES * 2)
    in_handle = shm.create_shared_memory_region("input_data", f"/{KEY}_in", BYTES * 2)
    shm.set_shared_memory_region(in_handle, [input0])
    shm.set_shared_memory_region(in_handle, [input1], offset=BYTES)
    yield in_handle, out_handle, input0, input1
    shm.destroy_shared_memory_region(in_handle)
    shm.destroy_shared_memory_region(out_handle)


def tensors(client: Any, module: Any) -> tuple[list[Any], list[Any]]:
    """INPUT0/INPUT1 and OUTPUT0/OUTPUT1, all naming their regions, as the Triton examples do."""
    client.register_system_shared_memory("output_data", f"/{KEY}_out", BYTES * 2)
    client.register_system_shared_memory("input_data", f"/{KEY}_in", BYTES * 2)
    inputs = [
        module.InferInput("INPUT0", [ROWS, WIDTH], "INT32"),
        module.InferInput("INPUT1", [ROWS, WIDTH], "INT32"),
    ]
    inputs[0].set_shared_memory("input_data", BYTES)
    inputs[1].set_shared_memory("input_data", BYTES, offset=BYTES)
    outputs = [
        module.InferRequestedOutput("OUTPUT0", binary_data=True)
        if module is httpclient
        else module.InferRequestedOutput("OUTPUT0"),
        module.InferRequestedOutput("OUTPUT1", binary_data=True)
        if module is httpclient
        else module.InferRequestedOutput("OUTPUT1"),
    ]
    outputs[0].set_shared_memory("output_data", BYTES)
    outputs[1].set_shared_memory("output_data", BYTES, offset=BYTES)
    return inputs, outputs


def field(output: Any, name: str) -> Any:
    return output[name] if isinstance(output, dict) else getattr(output, name)


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_inputs_and_outputs_through_shared_memory(
    server: ServerThread, regions: Any, module: Any
) -> None:
    _in_handle, out_handle, input0, input1 = regions
    port = server.server.http_port if module is httpclient else server.server.grpc_port
    client = module.InferenceServerClient(f"127.0.0.1:{port}")
    client.unregister_system_shared_memory()
    inputs, outputs = tensors(client, module)
    status = client.get_system_shared_memory_status()
    if module is grpcclient:
        status = [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in status.regions.values()
        ]
    assert sorted(status, key=lambda r: r["name"]) == [
        {"name": "input_data", "key": f"/{KEY}_in", "offset": 0, "byte_size": BYTES * 2},
        {"name": "output_data", "key": f"/{KEY}_out", "offset": 0, "byte_size": BYTES * 2},
    ]
    results = client.infer(MODEL, inputs, outputs=outputs)
    values = []
    for name, offset in (("OUTPUT0", 0), ("OUTPUT1", BYTES)):
        output = results.get_output(name)
        assert output is not None
        shape = list(field(output, "shape"))
        dtype = triton_to_np_dtype(field(output, "datatype"))
        assert shape == [ROWS, WIDTH] and dtype == np.int32
        values.append(shm.get_contents_as_numpy(out_handle, dtype, shape, offset=offset))
    np.testing.assert_array_equal(values[0], input0 + input1)
    np.testing.assert_array_equal(values[1], input0 - input1)
    client.unregister_system_shared_memory("input_data")
    remaining = client.get_system_shared_memory_status()
    names = [r["name"] for r in remaining] if module is httpclient else list(remaining.regions)
    assert names == ["output_data"]
    client.unregister_system_shared_memory()


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_regions_are_confined(server: ServerThread, regions: Any, module: Any) -> None:
    port = server.server.http_port if module is httpclient else server.server.grpc_port
    client = module.InferenceServerClient(f"127.0.0.1:{port}")
    client.unregister_system_shared_memory()

    def refused(call: Any, message: str) -> None:
        with pytest.raises(InferenceServerException, match=message) as error:
            call()
        if module is grpcclient:
            assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        else:
            assert error.value.status() == "400"

    # A region larger than its shm object, or a key that is a path, is never mapped.
    refused(
        lambda: client.register_system_shared_memory("big", f"/{KEY}_in", BYTES * 2 + 1),
        "past the end",
    )
    refused(
        lambda: client.register_system_shared_memory("etc", "/../etc/passwd", 16),
        "not a plain shm name",
    )
    refused(lambda: client.register_system_shared_memory("gone", "/no_such_shm_x", 16), "no shm")
    refused(
        lambda: client.register_system_shared_memory("empty", f"/{KEY}_in", 0),
        "byte_size must be an integer >= 1",
    )
    inputs, outputs = tensors(client, module)
    refused(
        lambda: client.register_system_shared_memory("input_data", f"/{KEY}_in", 8),
        "already registered",
    )
    # An input past the registered size (offset + size > 2 tensors): 400, nothing read.
    inputs[1].set_shared_memory("input_data", BYTES, offset=BYTES + 4)
    refused(lambda: client.infer(MODEL, inputs, outputs=outputs), "run past the end")
    inputs[1].set_shared_memory("input_data", BYTES, offset=BYTES)
    # An output region too small for the output, or past the region's end.
    outputs[1].set_shared_memory("output_data", BYTES - 4, offset=BYTES)
    refused(lambda: client.infer(MODEL, inputs, outputs=outputs), "more than the")
    outputs[1].set_shared_memory("output_data", BYTES, offset=BYTES + 4)
    refused(lambda: client.infer(MODEL, inputs, outputs=outputs), "run past the end")
    client.unregister_system_shared_memory("output_data")
    outputs[1].set_shared_memory("output_data", BYTES, offset=BYTES)
    refused(lambda: client.infer(MODEL, inputs, outputs=outputs), "is not registered")
    client.unregister_system_shared_memory()
    assert client.is_server_ready()


def test_shared_memory_is_off_by_default(engine: Path) -> None:
    thread = start(engine, allow=False)
    try:
        port = thread.server.http_port
        assert port is not None
        status, raw = fetch(port, "/v2/systemsharedmemory/status")
        assert status == 400 and b"--allow-shared-memory" in raw
        body = (
            b'{"inputs":[{"name":"INPUT0","datatype":"INT32","shape":[1,16],'
            b'"parameters":{"shared_memory_region":"r","shared_memory_byte_size":64}}]}'
        )
        status, raw = fetch(port, f"/v2/models/{MODEL}/infer", body)
        assert status == 400 and b"--allow-shared-memory" in raw
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{thread.server.grpc_port}")
        with pytest.raises(InferenceServerException, match="--allow-shared-memory") as error:
            client.register_system_shared_memory("r", f"/{KEY}_in", 16)
        assert error.value.status() == "StatusCode.UNIMPLEMENTED"
    finally:
        thread.stop()
