"""TensorRT builder and runner against the strict test doubles (no GPU, no TensorRT here).

A two-op ONNX graph (int64 ``x`` [batch, 4] -> float ``y = 2 * x``) keeps these fast; the tiny
BERT scenarios live in tests/integration/test_tensorrt_fake.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.fakes.install import FakeGpu, installed_fakes
from tests.fakes.models import PROFILE, build_dir
from trtpipe.build import BuildConfig, resolve_backend
from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import (
    BackendUnavailableError,
    BuildError,
    EngineMismatchError,
    InputError,
    RunnerError,
    TrtpipeError,
)


@pytest.fixture
def fake_gpu() -> Iterator[FakeGpu]:
    """One fake GPU (compute capability 9.0) and fake TensorRT 10.13 for the test."""
    with installed_fakes() as handle:
        yield handle


def runner(path: Path, index: int = 0):
    from trtpipe.runners.tensorrt import TensorRTRunner

    return TensorRTRunner(EngineDir(path), Device("cuda", index))


def test_build_records_version_and_arch(fake_gpu: FakeGpu, tmp_path: Path):
    engine = EngineDir(build_dir(tmp_path))
    assert engine.manifest.versions["tensorrt"] == "10.13.3.9"
    assert engine.manifest.device["compute_capability"] == "9.0"
    assert engine.engine_path.read_bytes().startswith(b"FAKETRTPLAN")
    assert fake_gpu.trt.STATS["builds"] == 1


def test_auto_backend_picks_tensorrt_only_with_a_gpu(fake_gpu: FakeGpu):
    assert resolve_backend("auto") == "tensorrt"
    fake_gpu.state.device_count = 0
    assert resolve_backend("auto") == "onnxruntime"
    with pytest.raises(BackendUnavailableError, match="--backend onnxruntime"):
        resolve_backend("tensorrt")


def test_infer_values_one_sync_reused_buffers_no_leaks(fake_gpu: FakeGpu, tmp_path: Path):
    path = build_dir(tmp_path)
    state = fake_gpu.state
    trt_runner = runner(path)
    trt_runner.load()
    mallocs, host_allocs = state.mallocs, state.host_allocs_made
    assert (mallocs, host_allocs) == (2, 2)  # one device + one pinned buffer per tensor
    for batch in (3, 8, 1):
        x = np.arange(batch * 4, dtype=np.int64).reshape(batch, 4) - 5
        syncs = state.synchronizations
        out = trt_runner.infer({"x": x})
        assert state.synchronizations == syncs + 1
        assert out["y"].shape == (batch, 4) and out["y"].dtype == np.float32
        np.testing.assert_array_equal(out["y"], 2.0 * x)
    # int32 feeds are widened to the engine's int64 before the copy
    out = trt_runner.infer({"x": np.full((2, 4), 7, dtype=np.int32)})
    np.testing.assert_array_equal(out["y"], np.full((2, 4), 14.0))
    assert (state.mallocs, state.host_allocs_made) == (mallocs, host_allocs)
    assert fake_gpu.trt.STATS["launches"] == 4
    trt_runner.close()
    trt_runner.close()
    assert fake_gpu.leaks() == {"device": 0, "host": 0, "streams": 0}
    assert state.frees == state.mallocs and state.host_frees == state.host_allocs_made
    with pytest.raises(TrtpipeError, match="not loaded"):
        trt_runner.infer({"x": np.zeros((1, 4), np.int64)})


def test_outputs_are_copies_not_views_of_pinned_memory(fake_gpu: FakeGpu, tmp_path: Path):
    with runner(build_dir(tmp_path)) as trt_runner:
        first = trt_runner.infer({"x": np.ones((2, 4), np.int64)})["y"]
        trt_runner.infer({"x": np.full((2, 4), 5, np.int64)})
    np.testing.assert_array_equal(first, np.full((2, 4), 2.0))


@pytest.mark.parametrize("shape", [(9, 4), (0, 4), (2, 5), (4,)])
def test_shape_outside_profile_fails_before_launch(
    fake_gpu: FakeGpu, tmp_path: Path, shape: tuple[int, ...]
):
    with runner(build_dir(tmp_path)) as trt_runner:
        with pytest.raises(InputError, match="'x'"):
            trt_runner.infer({"x": np.zeros(shape, np.int64)})
        assert fake_gpu.trt.STATS["launches"] == 0
        assert fake_gpu.state.synchronizations == 0


def test_other_tensorrt_version_is_refused(fake_gpu: FakeGpu, tmp_path: Path):
    path = build_dir(tmp_path)
    fake_gpu.trt.reset("11.1.0.2")
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10\.13\.3\.9.*11\.1\.0\.2.*rebuild"):
        runner(path).load()
    assert fake_gpu.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_same_minor_other_patch_is_refused_by_the_plan(fake_gpu: FakeGpu, tmp_path: Path):
    path = build_dir(tmp_path)
    fake_gpu.trt.reset("10.13.9.1")  # manifest check passes (10.13); the plan itself does not
    with pytest.raises(EngineMismatchError, match=r"not compatible with this version.*rebuild"):
        runner(path).load()
    assert fake_gpu.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_other_gpu_arch_is_refused(fake_gpu: FakeGpu, tmp_path: Path):
    path = build_dir(tmp_path)
    fake_gpu.state.capability = (8, 6)
    with pytest.raises(EngineMismatchError, match=r"compute capability 9\.0.*8\.6.*rebuild"):
        runner(path).load()


def test_no_gpu_is_a_clear_error(fake_gpu: FakeGpu, tmp_path: Path):
    path = build_dir(tmp_path)
    fake_gpu.state.device_count = 0
    with pytest.raises(BackendUnavailableError, match="cudaSetDevice"):
        runner(path).load()


def test_cpu_device_is_refused(fake_gpu: FakeGpu, tmp_path: Path):
    from trtpipe.runners.tensorrt import TensorRTRunner

    with pytest.raises(InputError, match="CUDA device"):
        TensorRTRunner(EngineDir(build_dir(tmp_path)), Device("cpu", 0))


def test_corrupt_onnx_gives_parser_errors(fake_gpu: FakeGpu, tmp_path: Path):
    from trtpipe.build.tensorrt import build_tensorrt

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 not a protobuf \xff\xff")
    config = BuildConfig(onnx_path=bad, output=tmp_path / "e", device=Device("cuda", 0))
    with pytest.raises(BuildError, match=r"could not parse bad\.onnx: Failed to parse ONNX"):
        build_tensorrt(bad, tmp_path, PROFILE, config)


def test_unsupported_op_names_node_and_operator(fake_gpu: FakeGpu, tmp_path: Path):
    with pytest.raises(BuildError) as info:
        build_dir(tmp_path, op="FancyScale")
    assert "node scale (FancyScale): No importer registered for op: FancyScale" in str(info.value)
    assert not (tmp_path / "engine" / "engine.plan").exists()


def test_timing_cache_written_and_reused(fake_gpu: FakeGpu, tmp_path: Path):
    cache = tmp_path / "cache" / "timing.cache"
    build_dir(tmp_path / "a", timing_cache=cache)
    assert cache.read_bytes().startswith(b"FAKETRTCACHE")
    assert fake_gpu.trt.STATS["timing_cache_misses"] == 1
    build_dir(tmp_path / "b", timing_cache=cache)
    assert fake_gpu.trt.STATS["timing_cache_hits"] == 1
    assert [p.name for p in cache.parent.iterdir()] == ["timing.cache"]  # no temp files left


def test_unusable_timing_cache_starts_fresh(fake_gpu: FakeGpu, tmp_path: Path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"garbage")
    build_dir(tmp_path, timing_cache=cache)
    assert cache.read_bytes().startswith(b"FAKETRTCACHE")


def test_worker_thread_on_second_gpu(tmp_path: Path):
    """CUDA's current device is per thread: infer must select the runner's GPU itself."""
    with installed_fakes(device_count=2):
        path = build_dir(tmp_path)
        trt_runner = runner(path, index=1)
        trt_runner.load()
        results: dict[str, object] = {}

        def work() -> None:
            try:
                results["y"] = trt_runner.infer({"x": np.ones((2, 4), np.int64)})["y"]
            except Exception as exc:  # surfaced below
                results["error"] = exc

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        trt_runner.close()
    assert "error" not in results, results.get("error")
    np.testing.assert_array_equal(results["y"], np.full((2, 4), 2.0))


def test_cuda_check_names_the_call(fake_gpu: FakeGpu):
    from trtpipe import cuda

    with pytest.raises(RunnerError, match=r"cudaFree failed: cudaErrorInvalidDevicePointer"):
        cuda.check(fake_gpu.cuda.cudaFree(0x1234), "cudaFree")
    assert cuda.check(fake_gpu.cuda.cudaGetDeviceCount(), "cudaGetDeviceCount") == 1
    assert cuda.check(fake_gpu.cuda.cudaSetDevice(0), "cudaSetDevice") is None
