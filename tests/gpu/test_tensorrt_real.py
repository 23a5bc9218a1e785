"""The TensorRT scenarios of tests/*/test_tensorrt_fake.py on real TensorRT and a CUDA GPU.

Skipped cleanly without the ``tensorrt`` package, cuda-python or a visible GPU; the Dockerfile
(TensorRT base image) runs them with ``pytest -m gpu``.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")

from click.testing import CliRunner  # noqa: E402

from trtpipe.build import BuildConfig, build_engine_dir  # noqa: E402
from trtpipe.cli.main import cli  # noqa: E402
from trtpipe.devices import Device, cuda_device_count  # noqa: E402
from trtpipe.engine import EngineDir  # noqa: E402
from trtpipe.errors import BuildError, EngineMismatchError, InputError  # noqa: E402
from trtpipe.runners.onnxruntime import OnnxRuntimeRunner  # noqa: E402

if getattr(trt, "IS_TEST_DOUBLE", False):  # never test the double as if it were TensorRT
    pytest.skip("the tensorrt module is a test double", allow_module_level=True)
if cuda_device_count() == 0:
    pytest.skip("no CUDA GPU visible", allow_module_level=True)

GPU = Device("cuda", 0)


def bert_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def timing_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trt-cache") / "timing.cache"


@pytest.fixture(scope="module")
def trt_engine(tiny_bert_onnx: Path, timing_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    return build_engine_dir(
        BuildConfig(
            onnx_path=tiny_bert_onnx,
            output=tmp_path_factory.mktemp("trt-engine") / "engine",
            backend="tensorrt",
            device=GPU,
            opt_shapes={"input_ids": [4, 16]},
            max_shapes={"input_ids": [8, 64]},
            workspace_mb=1024,
            timing_cache=timing_cache,
        )
    )


def runner(engine: EngineDir | Path):
    from trtpipe.runners.tensorrt import TensorRTRunner

    return TensorRTRunner(engine if isinstance(engine, EngineDir) else EngineDir(engine), GPU)


def test_manifest_records_version_arch_profile(trt_engine: EngineDir):
    from trtpipe import cuda

    manifest = trt_engine.manifest
    assert manifest.backend == "tensorrt"
    assert manifest.versions["tensorrt"] == trt.__version__
    assert manifest.device["compute_capability"] == cuda.device_compute_capability(0)
    assert manifest.profile["input_ids"].max == [8, 64]
    assert trt_engine.engine_path.stat().st_size > 10_000


def test_outputs_match_onnxruntime_and_buffers_are_reused(
    trt_engine: EngineDir, tiny_bert_engine: Path
):
    with (
        runner(trt_engine) as trt_runner,
        OnnxRuntimeRunner(EngineDir(tiny_bert_engine), Device("cpu")) as reference,
    ):
        pointers = {n: b.ptr for n, b in trt_runner._device_buffers.items()}
        for batch, seq in ((1, 5), (8, 64), (3, 17)):
            feeds = bert_feeds(batch, seq, seed=batch)
            got, want = trt_runner.infer(feeds), reference.infer(feeds)
            for name in want:
                assert got[name].shape == want[name].shape
                # TensorRT may use TF32 for FP32 matmuls: compare with a TF32-sized tolerance.
                np.testing.assert_allclose(got[name], want[name], atol=2e-3, rtol=0)
                assert cosine_rows(got[name], want[name]).min() > 0.9999
        assert {n: b.ptr for n, b in trt_runner._device_buffers.items()} == pointers
    assert trt_runner._device_buffers == {} and trt_runner._stream is None
    trt_runner.close()  # twice is fine


def test_shape_outside_profile_is_input_error(trt_engine: EngineDir):
    with runner(trt_engine) as trt_runner, pytest.raises(InputError, match="profile"):
        trt_runner.infer(bert_feeds(9, 8))


def test_infer_from_a_worker_thread(trt_engine: EngineDir):
    results: dict[str, object] = {}
    with runner(trt_engine) as trt_runner:
        expected = trt_runner.infer(bert_feeds(2, 12))["last_hidden_state"]

        def work() -> None:
            try:
                results["y"] = trt_runner.infer(bert_feeds(2, 12))["last_hidden_state"]
            except Exception as exc:
                results["error"] = exc

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert "error" not in results, results.get("error")
    np.testing.assert_array_equal(results["y"], expected)


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("versions", "tensorrt", "9.0.1.4", r"TensorRT 9\.0\.1\.4.*rebuild"),
        ("device", "compute_capability", "7.5", r"compute capability 7\.5.*rebuild"),
    ],
)
def test_other_version_or_arch_is_refused(
    trt_engine: EngineDir, tmp_path: Path, section: str, key: str, value: str, match: str
):
    copy = tmp_path / "engine"
    shutil.copytree(trt_engine.path, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data[section][key] = value
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match=match):
        runner(copy).load()


def test_onnxruntime_engine_is_refused(tiny_bert_engine: Path):
    with pytest.raises(EngineMismatchError, match="not tensorrt"):
        runner(tiny_bert_engine)


def test_timing_cache_written_and_reused(
    trt_engine: EngineDir, timing_cache: Path, tiny_bert_onnx: Path, tmp_path: Path
):
    """A build with an existing cache keeps its entries and adds its own.

    Building another profile (other opt shapes, so other timing keys) once with the shared
    cache and once with a fresh one: had the cache been ignored, both files would hold the
    same entries; reused, the shared one also keeps the first build's and is larger.
    """
    first = timing_cache.read_bytes()
    assert len(first) > 0

    def build(cache: Path, out: str) -> None:
        build_engine_dir(
            BuildConfig(
                onnx_path=tiny_bert_onnx,
                output=tmp_path / out,
                backend="tensorrt",
                device=GPU,
                opt_shapes={"input_ids": [1, 8]},
                max_shapes={"input_ids": [2, 8]},
                timing_cache=cache,
            )
        )

    shared = tmp_path / "shared.cache"
    shared.write_bytes(first)
    build(shared, "with-cache")
    fresh = tmp_path / "fresh.cache"
    build(fresh, "fresh")
    assert fresh.stat().st_size > 0
    assert shared.stat().st_size > fresh.stat().st_size
    assert shared.stat().st_size > len(first)


def test_unsupported_op_is_build_error_with_parser_details(tiny_bert_onnx: Path, tmp_path: Path):
    import onnx

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bert_onnx.parent, model_dir)
    model = onnx.load(str(model_dir / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Gather")
    node.op_type = "FancyGather"
    onnx.save(model, str(model_dir / "model.onnx"))
    with pytest.raises(BuildError, match="FancyGather"):
        build_engine_dir(
            BuildConfig(
                onnx_path=model_dir / "model.onnx",
                output=tmp_path / "e",
                backend="tensorrt",
                device=GPU,
            )
        )
    assert not (tmp_path / "e").exists()


def test_cli_build_fp16_and_run(tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path: Path):
    from trtpipe.runners import runner_for

    out = tmp_path / "fp16"
    result = CliRunner().invoke(
        cli,
        ["build", str(tiny_bert_onnx), "-o", str(out), "--fp16", "--backend", "tensorrt",
         "--max-shapes", "input_ids:8x64", "--opt-shapes", "input_ids:4x16"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    feeds = bert_feeds(4, 20)
    with (
        runner_for(EngineDir(out), GPU) as trt_runner,
        OnnxRuntimeRunner(EngineDir(tiny_bert_engine), Device("cpu")) as reference,
    ):
        got = trt_runner.infer(feeds)["last_hidden_state"]
        want = reference.infer(feeds)["last_hidden_state"]
    assert cosine_rows(got, want).min() >= 0.999
