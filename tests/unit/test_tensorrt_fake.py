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


# -- memory like a real engine ---------------------------------------------------------------
LLAMA3_8B = {"layers": 32, "kv_heads": 8, "head_dim": 128, "vocab": 128256, "max_positions": 8192}


@pytest.mark.parametrize(("kv_dtype", "kv_itemsize"), [("float16", 2), ("float32", 4)])
def test_llama3_8b_shaped_decoder_memory_budget(
    fake_gpu: FakeGpu, tmp_path: Path, kv_dtype: str, kv_itemsize: int
):
    """Shapes only (no weights): the default profile is batch 32, prompt 512, past 512.

    Pinned host memory holds only what is staged: the token inputs and one logits row per
    sequence, about 16 MiB, where pinning every tensor at the profile maximum took ~20 GB.
    """
    from tests.fakes.models import write_shape_only_decoder
    from trtpipe.generation.tensorrt import TensorRTDecoderSession
    from trtpipe.runners.tensorrt import TensorRTRunner

    path = write_shape_only_decoder(tmp_path / "llama", kv_dtype=kv_dtype, **LLAMA3_8B)
    state = fake_gpu.state
    state.host_memory = 64 << 20  # a host that lets the process lock only 64 MiB
    session = TensorRTDecoderSession(EngineDir(path), Device("cuda", 0))
    assert (session.spec.max_batch, session.spec.max_prompt, session.spec.max_total) == (
        32,
        512,
        513,
    )
    session.load()
    tokens = 32 * 512 * 8  # int64 input_ids, position_ids: [32, 512]
    mask = 32 * 513 * 8  # the mask is never longer than max_total
    logits_rows = 32 * 128256 * 4  # last position only, float32
    assert state.pinned_bytes[0] == 2 * tokens + mask + logits_rows == 16_810_240
    kv = 32 * 2 * 2 * (32 * 8 * 512 * 128 * kv_itemsize)  # layers, key/value, ping-pong
    prefill_logits = 32 * 512 * 128256 * 4
    device = kv + prefill_logits + 2 * tokens + mask
    assert state.device_bytes[0] == device
    assert device == {2: 12_700_745_984, 4: 16_995_713_280}[kv_itemsize]
    memory = session.memory_bytes()
    assert memory["device_buffers"] == device and memory["pinned_host"] == 16_810_240
    session.close()
    assert state.device_bytes[0] == state.pinned_bytes[0] == 0
    assert fake_gpu.leaks() == {"device": 0, "host": 0, "streams": 0}

    # The plain runner stages every tensor at the profile maximum: it cannot pin that much.
    with pytest.raises(RunnerError, match="cudaHostAlloc failed: cudaErrorMemoryAllocation"):
        TensorRTRunner(EngineDir(path), Device("cuda", 0)).load()
    assert fake_gpu.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_decoder_past_the_device_memory_fails_cleanly(fake_gpu: FakeGpu, tmp_path: Path):
    from tests.fakes.models import write_shape_only_decoder
    from trtpipe.generation.tensorrt import TensorRTDecoderSession

    path = write_shape_only_decoder(tmp_path / "llama", kv_dtype="float16", **LLAMA3_8B)
    fake_gpu.state.total_memory = 11 << 30  # the buffers need 11.83 GiB
    session = TensorRTDecoderSession(EngineDir(path), Device("cuda", 0))
    with pytest.raises(RunnerError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        session.load()
    assert fake_gpu.leaks() == {"device": 0, "host": 0, "streams": 0}
    assert fake_gpu.state.peak_device_bytes[0] <= 11 << 30


@pytest.mark.parametrize(("kv_dtype", "kv_itemsize"), [("float16", 2), ("float32", 4)])
def test_toy_decoder_keeps_its_kv_dtype_and_ping_pongs(
    fake_gpu: FakeGpu, tmp_path: Path, kv_dtype: str, kv_itemsize: int
):
    """A decoder whose tokens depend on the whole cache, stepped through the strict fakes."""
    from tests.fakes.models import build_toy_decoder, toy_greedy
    from trtpipe.generation.tensorrt import TensorRTDecoderSession

    session = TensorRTDecoderSession(
        EngineDir(build_toy_decoder(tmp_path / "toy", kv_dtype)), Device("cuda", 0)
    )
    assert {c.dtype for c in session.spec.cache} == {kv_dtype}
    session.load()
    state = fake_gpu.state
    kv = 4 * (4 * 1 * 15 * 2 * kv_itemsize)  # key/value x past/present, [4, 1, 15, 2]
    staged = 4 * 8 * 8 + 4 * 16 * 8  # input_ids [4, 8], attention_mask [4, 16], int64
    assert state.pinned_bytes[0] == staged + 4 * 37 * 4  # + one logits row per sequence
    assert state.device_bytes[0] == staged + kv + 4 * 8 * 37 * 4  # + prefill logits

    prompts = [[5, 9, 3], [0, 7, 11]]  # the second left-padded with 0 (adds nothing)
    new_tokens = 12  # prompt 3 + 11 fed tokens = 14 cached positions of 15
    mallocs = state.mallocs
    session.start(2)
    ids = np.array(prompts, np.int64)
    got: list[list[int]] = [[], []]
    for step in range(new_tokens):
        length = session.past_length + ids.shape[1]
        logits = session.step(ids, np.ones((2, length), np.int64), np.zeros_like(ids))
        assert logits.dtype == np.float32 and logits.shape == (2, 37)
        nxt = logits.argmax(1)
        for row, token in enumerate(nxt):
            got[row].append(int(token))
        ids = nxt[:, None].astype(np.int64)
        if step == 4:
            cache = session.read_cache()
    assert got == toy_greedy(prompts, new_tokens)
    assert state.mallocs == mallocs  # no allocation while stepping

    # The cache survives a trip through the host (as the batching scheduler regroups rows).
    assert [a.dtype for a in cache] == [np.dtype(kv_dtype)] * 2
    assert cache[0].shape == (2, 1, 7, 2)  # 3 prompt + 4 fed tokens
    np.testing.assert_array_equal(cache[0][0, 0, :3, 0], [5, 9, 3])
    session.start(2)
    session.write_cache(cache)
    assert (session.batch, session.past_length) == (2, 7)
    ids = np.array([[got[0][4]], [got[1][4]]], np.int64)
    logits = session.step(ids, np.ones((2, 8), np.int64), np.zeros_like(ids))
    assert logits.argmax(1).tolist() == [got[0][5], got[1][5]]
    with pytest.raises(InputError, match="exceed the engine's KV room of 15"):
        session.step(np.zeros((2, 8), np.int64), np.ones((2, 16), np.int64), np.zeros((2, 8)))
    session.close()
    assert fake_gpu.leaks() == {"device": 0, "host": 0, "streams": 0}


# -- real-API behaviour handled: raises, stale errors, drivers, external data ------------------
def test_profile_selection_raising_is_one_clear_error(
    fake_gpu: FakeGpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from tests.fakes.tensorrt_engine import IExecutionContext

    def refuse(self: object, index: int, stream: int) -> bool:
        raise RuntimeError("Error in set optimization profile.")

    path = build_dir(tmp_path)
    monkeypatch.setattr(IExecutionContext, "set_optimization_profile_async", refuse)
    with pytest.raises(RunnerError, match="could not select optimization profile 0 on cuda:0"):
        runner(path).load()
    assert fake_gpu.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_rejected_shape_range_is_a_build_error(fake_gpu: FakeGpu, tmp_path: Path):
    from tests.fakes.models import save_double_model
    from trtpipe.build.tensorrt import build_tensorrt
    from trtpipe.engine import ShapeRange

    onnx_path = save_double_model(tmp_path / "model.onnx")
    config = BuildConfig(onnx_path=onnx_path, output=tmp_path, device=Device("cuda", 0))
    bad = {"x": ShapeRange([4, 4], [2, 4], [8, 4])}  # min > opt
    with pytest.raises(BuildError, match=r"rejected the shape range of input 'x' \(min \[4, 4\]"):
        build_tensorrt(onnx_path, tmp_path, bad, config)
    assert not (tmp_path / "engine.plan").exists()


def test_stale_timing_cache_error_is_not_blamed_for_a_failed_build(
    fake_gpu: FakeGpu, tmp_path: Path
):
    from tests.fakes.models import save_double_model
    from trtpipe.build.tensorrt import build_tensorrt
    from trtpipe.engine import ShapeRange

    onnx_path = save_double_model(tmp_path / "model.onnx")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"garbage")
    config = BuildConfig(
        onnx_path=onnx_path, output=tmp_path, device=Device("cuda", 0), timing_cache=cache
    )
    wrong = {"x": ShapeRange([1, 5], [2, 5], [8, 5])}  # the model's second dim is 4
    with pytest.raises(BuildError) as info:
        build_tensorrt(onnx_path, tmp_path, wrong, config)
    assert "x: no or incompatible profile shape" in str(info.value)
    assert "timing cache" not in str(info.value)


def test_driver_older_than_the_runtime_is_named(fake_gpu: FakeGpu, tmp_path: Path):
    """cuda-python 13 on a CUDA 12.4 driver: every call fails with cudaErrorInsufficientDriver."""
    from trtpipe import cuda

    path = build_dir(tmp_path)
    fake_gpu.state.driver_version = 12040
    with pytest.raises(BackendUnavailableError) as info:
        runner(path).load()
    message = str(info.value)
    assert "cudaSetDevice(0) failed: cudaErrorInsufficientDriver" in message
    assert "driver/runtime mismatch: the NVIDIA driver supports CUDA 12.4" in message
    assert "cuda-python needs CUDA 13.0; pip install 'trtpipe[gpu-cu12]'" in message
    assert "no CUDA GPU" not in message
    assert "driver supports CUDA 12.4" in (cuda.unusable_reason() or "")
    fake_gpu.state.driver_version = 0  # no driver installed at all
    assert "no NVIDIA driver is installed" in (cuda.unusable_reason() or "")
    fake_gpu.state.driver_version = 13000
    assert cuda.unusable_reason() is None


@pytest.mark.parametrize("code", [34, 46, 802, 803, 804])
def test_unusable_gpu_codes_are_backend_unavailable(fake_gpu: FakeGpu, code: int):
    from trtpipe import cuda

    name = fake_gpu.cuda.cudaError_t(code).name
    with pytest.raises(BackendUnavailableError, match=f"cudaSetDevice failed: {name}"):
        cuda.check((fake_gpu.cuda.cudaError_t(code),), "cudaSetDevice")


def test_a_device_fault_is_sticky_for_the_runner(fake_gpu: FakeGpu, tmp_path: Path):
    """After an illegal address, the context is gone: later calls fail, close does not raise."""
    with runner(build_dir(tmp_path)) as trt_runner:
        trt_runner.infer({"x": np.ones((2, 4), np.int64)})
        fake_gpu.state.fault(0, fake_gpu.cuda.cudaError_t.cudaErrorIllegalAddress)
        for _ in range(2):
            with pytest.raises(RunnerError, match="cudaErrorIllegalAddress"):
                trt_runner.infer({"x": np.ones((2, 4), np.int64)})
    # Real CUDA cannot free a dead context's memory either; it goes with the process.
    assert fake_gpu.leaks()["device"] == 2


def _external_data_copy(source: Path, target_dir: Path) -> Path:
    """``source`` re-saved with every initializer in ``weights.bin`` beside it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    for init in model.graph.initializer:  # only raw_data tensors move to external data
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
    target_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(target_dir / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    return target_dir / "model.onnx"


def test_fp32_build_finds_external_weights_in_the_export_dir(fake_gpu: FakeGpu, tmp_path: Path):
    """The build copies only the graph into its temp dir; the parser still finds the weights."""
    import shutil

    from tests.fakes.models import save_double_model
    from trtpipe.build.tensorrt import build_tensorrt

    export = _external_data_copy(save_double_model(tmp_path / "src.onnx"), tmp_path / "export")
    assert (export.parent / "weights.bin").stat().st_size == 4  # the constant 2.0
    work = tmp_path / "work"
    work.mkdir()
    typed = work / "model.fp32.onnx"
    shutil.copyfile(export, typed)  # what the fp32 precision step does
    config = BuildConfig(onnx_path=export, output=work, device=Device("cuda", 0))
    build_tensorrt(typed, work, PROFILE, config)
    assert sorted(p.name for p in work.iterdir()) == ["engine.plan", "model.fp32.onnx"]
    # Without the export dir to look in, the error names the missing file.
    config = BuildConfig(onnx_path=typed, output=work, device=Device("cuda", 0))
    with pytest.raises(BuildError, match=r"external data \['weights.bin'\]"):
        build_tensorrt(typed, work, PROFILE, config)
