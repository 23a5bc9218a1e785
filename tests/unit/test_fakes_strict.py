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
