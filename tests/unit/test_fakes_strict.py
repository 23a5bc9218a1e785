"""The test doubles reject what real TensorRT 10/11 and CUDA reject (else they prove nothing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fakes.install import FakeGpu, installed_fakes
from tests.fakes.models import build_dir


@pytest.fixture
def fake_gpu() -> Iterator[FakeGpu]:
    with installed_fakes() as handle:
        yield handle


class Launch:
    """A hand-driven engine launch through the raw fake APIs (no trtpipe code)."""

    def __init__(self, fake_gpu: FakeGpu, path: Path):
        trt, self.cuda = fake_gpu.trt, fake_gpu.cuda
        self.logger = trt.Logger()
        engine = trt.Runtime(self.logger).deserialize_cuda_engine(
            (path / "engine.plan").read_bytes()
        )
        self.context = engine.create_execution_context()
        self.stream = int(self.value(self.cuda.cudaStreamCreateWithFlags(1)))
        self.x_dev = self.value(self.cuda.cudaMalloc(8 * 4 * 8))
        self.y_dev = self.value(self.cuda.cudaMalloc(8 * 4 * 4))
        self.x_host = self.value(self.cuda.cudaHostAlloc(8 * 4 * 8, 0))
        self.y_host = self.value(self.cuda.cudaHostAlloc(8 * 4 * 4, 0))
        assert self.context.set_optimization_profile_async(0, self.stream)

    @staticmethod
    def value(result: tuple[Any, ...]) -> Any:
        assert int(result[0]) == 0, result
        return result[1]

    def host(self, ptr: int, dtype: Any, count: int) -> np.ndarray:
        return self.cuda.STATE.find_host(ptr, 1)[0].view(dtype)[:count]

    def errors(self) -> str:
        return " | ".join(message for _, message in self.logger.messages)


def test_removed_apis_do_not_exist(fake_gpu: FakeGpu):
    trt = fake_gpu.trt
    for owner, name in [
        (trt.BuilderFlag, "FP16"),
        (trt.BuilderFlag, "INT8"),
        (trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"),
        (trt.Builder, "build_engine"),
        (trt, "IInt8EntropyCalibrator2"),
    ]:
        assert not hasattr(owner, name), name
    from tests.fakes.tensorrt_engine import IExecutionContext

    assert not hasattr(IExecutionContext, "execute_async_v2")
    config = trt.Builder(trt.Logger()).create_builder_config()
    with pytest.raises(AttributeError):
        config.max_workspace_size = 1 << 30


def test_network_must_be_strongly_typed(fake_gpu: FakeGpu):
    builder = fake_gpu.trt.Builder(fake_gpu.trt.Logger())
    with pytest.raises(ValueError, match="STRONGLY_TYPED"):
        builder.create_network(0)
    with pytest.raises(ValueError, match="EXPLICIT_BATCH"):
        builder.create_network(1 << 0)
    assert builder.create_network(1 << 1).get_flag(
        fake_gpu.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    )


def test_context_rejects_bad_shapes_missing_shapes_addresses_default_stream(
    fake_gpu: FakeGpu, tmp_path: Path
):
    launch = Launch(fake_gpu, build_dir(tmp_path))
    ctx = launch.context
    assert not ctx.execute_async_v3(launch.stream)
    assert "input shapes not set for ['x']" in launch.errors()
    assert ctx.set_input_shape("x", (9, 4)) is False  # profile max is 8
    assert ctx.set_input_shape("x", (2, 5)) is False
    assert ctx.set_input_shape("x", (2, 4)) is True
    assert ctx.get_tensor_shape("y") == (2, 4)
    assert ctx.set_tensor_address("x", launch.x_dev)
    assert not ctx.execute_async_v3(launch.stream)
    assert "'y' has no address" in launch.errors()
    assert ctx.set_tensor_address("y", launch.y_dev)
    assert not ctx.execute_async_v3(0)
    assert "default stream" in launch.errors()
    assert not ctx.set_tensor_address("y", 0)
    assert fake_gpu.trt.STATS["launches"] == 0


def test_pageable_host_memory_is_refused(fake_gpu: FakeGpu, tmp_path: Path):
    launch = Launch(fake_gpu, build_dir(tmp_path))
    pageable = np.ones((2, 4), np.int64)
    cuda = fake_gpu.cuda
    h2d = cuda.cudaMemcpyKind.cudaMemcpyHostToDevice
    (err,) = cuda.cudaMemcpyAsync(launch.x_dev, pageable.ctypes.data, 64, h2d, launch.stream)
    assert err == cuda.cudaError_t.cudaErrorInvalidHostPointer
    assert "not pinned" in cuda.cudaGetErrorString(err)[1].decode()
    (err,) = cuda.cudaMemcpyAsync(launch.x_dev, launch.x_host, 64, h2d, 0)
    assert err == cuda.cudaError_t.cudaErrorInvalidResourceHandle  # the default stream


def test_results_appear_only_after_synchronize(fake_gpu: FakeGpu, tmp_path: Path):
    launch = Launch(fake_gpu, build_dir(tmp_path))
    cuda, ctx = fake_gpu.cuda, launch.context
    launch.host(launch.x_host, np.int64, 8)[:] = np.arange(8)
    kind = cuda.cudaMemcpyKind
    assert (
        cuda.cudaMemcpyAsync(
            launch.x_dev, launch.x_host, 64, kind.cudaMemcpyHostToDevice, launch.stream
        )[0]
        == 0
    )
    assert ctx.set_input_shape("x", (2, 4))
    assert ctx.set_tensor_address("x", launch.x_dev) and ctx.set_tensor_address("y", launch.y_dev)
    assert ctx.execute_async_v3(launch.stream)
    assert (
        cuda.cudaMemcpyAsync(
            launch.y_host, launch.y_dev, 32, kind.cudaMemcpyDeviceToHost, launch.stream
        )[0]
        == 0
    )
    y = launch.host(launch.y_host, np.float32, 8)
    assert not y.any()  # nothing ran yet
    assert cuda.cudaStreamSynchronize(launch.stream)[0] == 0
    np.testing.assert_array_equal(y, 2.0 * np.arange(8))


def test_dtype_mismatch_faults_at_sync(fake_gpu: FakeGpu, tmp_path: Path):
    """int32 data copied into the engine's int64 input covers only half the bytes needed."""
    launch = Launch(fake_gpu, build_dir(tmp_path))
    cuda, ctx = fake_gpu.cuda, launch.context
    h2d = cuda.cudaMemcpyKind.cudaMemcpyHostToDevice
    assert cuda.cudaMemcpyAsync(launch.x_dev, launch.x_host, 2 * 4 * 4, h2d, launch.stream)[0] == 0
    assert ctx.set_input_shape("x", (2, 4))
    assert ctx.set_tensor_address("x", launch.x_dev) and ctx.set_tensor_address("y", launch.y_dev)
    assert ctx.execute_async_v3(launch.stream)
    (err,) = cuda.cudaStreamSynchronize(launch.stream)
    assert err == cuda.cudaError_t.cudaErrorLaunchFailure
    assert "only 32 of 64 bytes" in cuda.cudaGetErrorString(err)[1].decode()


def test_stream_needs_its_device_current(tmp_path: Path):
    with installed_fakes(device_count=2) as fake_gpu:
        cuda = fake_gpu.cuda
        assert cuda.cudaSetDevice(1)[0] == 0
        stream = int(cuda.cudaStreamCreateWithFlags(1)[1])
        dev = cuda.cudaMalloc(64)[1]
        host = cuda.cudaHostAlloc(64, 0)[1]
        assert cuda.cudaSetDevice(0)[0] == 0
        h2d = cuda.cudaMemcpyKind.cudaMemcpyHostToDevice
        (err,) = cuda.cudaMemcpyAsync(dev, host, 64, h2d, stream)
        assert err == cuda.cudaError_t.cudaErrorInvalidResourceHandle
        assert cuda.cudaSetDevice(2)[0] == cuda.cudaError_t.cudaErrorInvalidDevice


def test_plans_from_other_versions_or_arch_do_not_load(fake_gpu: FakeGpu, tmp_path: Path):
    plan = (build_dir(tmp_path) / "engine.plan").read_bytes()
    trt = fake_gpu.trt
    logger = trt.Logger()
    fake_gpu.state.capability = (8, 9)
    assert trt.Runtime(logger).deserialize_cuda_engine(plan) is None
    fake_gpu.state.capability = (9, 0)
    trt.reset("11.0.0.1")
    assert trt.Runtime(logger).deserialize_cuda_engine(plan) is None
    assert trt.Runtime(logger).deserialize_cuda_engine(b"not a plan") is None
    assert len(logger.messages) == 3


def test_fakes_are_uninstalled_after_the_test():
    import sys

    with installed_fakes():
        import tensorrt

        assert tensorrt.IS_TEST_DOUBLE
    assert "tensorrt" not in sys.modules or not getattr(
        sys.modules["tensorrt"], "IS_TEST_DOUBLE", False
    )
    from cuda.bindings import runtime

    assert not getattr(runtime, "IS_TEST_DOUBLE", False)


def test_tensor_addresses_must_be_256_byte_aligned(fake_gpu: FakeGpu, tmp_path: Path):
    launch = Launch(fake_gpu, build_dir(tmp_path))
    assert not launch.context.set_tensor_address("x", launch.x_dev + 64)
    assert "not 256-byte aligned" in launch.errors()
    assert launch.context.set_tensor_address("x", launch.x_dev)


def test_profile_calls_raise_like_the_real_binding(fake_gpu: FakeGpu, tmp_path: Path):
    launch = Launch(fake_gpu, build_dir(tmp_path))
    with pytest.raises(RuntimeError, match="set optimization profile"):
        launch.context.set_optimization_profile_async(1, launch.stream)
    with pytest.raises(RuntimeError, match="set optimization profile"):
        launch.context.set_optimization_profile_async(0, 0)
    profile = fake_gpu.trt.Builder(fake_gpu.trt.Logger()).create_optimization_profile()
    with pytest.raises(RuntimeError, match="set_shape"):
        profile.set_shape("x", (4, 4), (2, 4), (8, 4))
    assert profile.set_shape("x", (1, 4), (2, 4), (8, 4)) is None


def test_device_memory_is_limited_and_counted_per_device(tmp_path: Path):
    with installed_fakes(device_count=2) as fake_gpu:
        cuda, state = fake_gpu.cuda, fake_gpu.state
        state.total_memory = 1 << 30
        a = Launch.value(cuda.cudaMalloc(600 << 20))
        err, ptr = cuda.cudaMalloc(600 << 20)
        assert err == cuda.cudaError_t.cudaErrorMemoryAllocation and ptr is None
        assert cuda.cudaSetDevice(1)[0] == 0
        b = Launch.value(cuda.cudaMalloc(600 << 20))  # another device has its own memory
        host = Launch.value(cuda.cudaHostAlloc(3 << 20, 0))
        assert state.device_bytes == {0: 600 << 20, 1: 600 << 20}
        assert state.pinned_bytes == {1: 3 << 20}
        state.host_memory = 4 << 20
        assert cuda.cudaHostAlloc(2 << 20, 0)[0] == cuda.cudaError_t.cudaErrorMemoryAllocation
        for result in (cuda.cudaFree(a), cuda.cudaFree(b), cuda.cudaFreeHost(host)):
            assert result[0] == 0
        assert state.device_bytes == {0: 0, 1: 0} and state.pinned_bytes == {1: 0}
        assert state.peak_device_bytes == {0: 600 << 20, 1: 600 << 20}


def test_allocations_belong_to_their_device_and_faults_stick(tmp_path: Path):
    """Memory of GPU 1 used by an engine on GPU 0 faults; the fault sticks to GPU 0 only."""
    with installed_fakes(device_count=2) as fake_gpu:
        cuda = fake_gpu.cuda
        launch = Launch(fake_gpu, build_dir(tmp_path))  # stream and buffers on device 0
        h2d = cuda.cudaMemcpyKind.cudaMemcpyHostToDevice
        assert cuda.cudaSetDevice(1)[0] == 0
        other = Launch.value(cuda.cudaMalloc(256))
        assert cuda.cudaSetDevice(0)[0] == 0
        (err,) = cuda.cudaMemcpyAsync(other, launch.x_host, 64, h2d, launch.stream)
        assert err == cuda.cudaError_t.cudaErrorInvalidValue  # no copies across devices
        assert "device memory of device 1" in cuda.cudaGetErrorString(err)[1].decode()
        # Pinned memory is pinned for the context that allocated it unless made portable.
        assert cuda.cudaSetDevice(1)[0] == 0
        pinned_1 = Launch.value(cuda.cudaHostAlloc(64, 0))
        portable = Launch.value(cuda.cudaHostAlloc(64, cuda.cudaHostAllocPortable))
        assert cuda.cudaSetDevice(0)[0] == 0
        (err,) = cuda.cudaMemcpyAsync(launch.x_dev, pinned_1, 64, h2d, launch.stream)
        assert err == cuda.cudaError_t.cudaErrorInvalidHostPointer
        assert cuda.cudaMemcpyAsync(launch.x_dev, portable, 64, h2d, launch.stream)[0] == 0

        ctx = launch.context
        assert cuda.cudaMemcpyAsync(launch.x_dev, launch.x_host, 64, h2d, launch.stream)[0] == 0
        assert ctx.set_input_shape("x", (2, 4))
        assert ctx.set_tensor_address("x", launch.x_dev) and ctx.set_tensor_address("y", other)
        assert ctx.execute_async_v3(launch.stream)
        (err,) = cuda.cudaStreamSynchronize(launch.stream)
        assert err == cuda.cudaError_t.cudaErrorIllegalAddress
        # Sticky: every later call needing device 0's context fails the same way...
        assert cuda.cudaMalloc(64)[0] == cuda.cudaError_t.cudaErrorIllegalAddress
        assert cuda.cudaStreamSynchronize(launch.stream)[0] == err
        assert cuda.cudaFree(launch.x_dev)[0] == err
        assert not ctx.execute_async_v3(launch.stream)
        # ...while device 1 still works.
        assert cuda.cudaSetDevice(1)[0] == 0
        assert cuda.cudaFree(other)[0] == 0


def test_parser_reads_external_weights_only_from_beside_the_model(
    fake_gpu: FakeGpu, tmp_path: Path
):
    import shutil

    import onnx
    from onnx import numpy_helper

    from tests.fakes.models import save_double_model

    model = onnx.load(str(save_double_model(tmp_path / "src.onnx")))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
    export = tmp_path / "export"
    export.mkdir()
    onnx.save_model(
        model, str(export / "model.onnx"), save_as_external_data=True, size_threshold=0,
        location="model.onnx_data",
    )  # fmt: skip
    trt = fake_gpu.trt

    def parse(path: Path | None) -> tuple[bool, str]:
        logger = trt.Logger()
        network = trt.Builder(logger).create_network(1 << 1)
        parser = trt.OnnxParser(network, logger)
        ok = (
            parser.parse_from_file(str(path))
            if path
            else parser.parse((export / "model.onnx").read_bytes())
        )
        return ok, " ".join(parser.get_error(i).desc() for i in range(parser.num_errors))

    assert parse(export / "model.onnx") == (True, "")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(export / "model.onnx", elsewhere / "model.onnx")
    ok, errors = parse(elsewhere / "model.onnx")
    assert not ok and "Failed to open file" in errors and "model.onnx_data" in errors
    ok, errors = parse(None)  # bytes alone: no directory to look in
    assert not ok and "beside the model file" in errors
    (elsewhere / "model.onnx_data").write_bytes(b"\0")  # too short for the tensor
    assert not parse(elsewhere / "model.onnx")[0]
