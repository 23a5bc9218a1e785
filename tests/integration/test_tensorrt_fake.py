"""The TensorRT backend end to end on the tiny BERT, with TensorRT and CUDA replaced by the
strict test doubles in tests/fakes (the fake engine computes with ONNX Runtime on the CPU).

What this proves: the build/run code drives the TensorRT 10.12+/11 and cuda-python 13 APIs
the way the doubles demand; it says nothing about real GPU speed (tests/gpu does that).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.fakes.install import FakeGpu, installed_fakes
from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.cli.main import cli
from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import EngineMismatchError
from trtpipe.runners import runner_for
from trtpipe.runners.onnxruntime import OnnxRuntimeRunner


@pytest.fixture
def fake_gpu() -> Iterator[FakeGpu]:
    with installed_fakes() as handle:
        yield handle


def bert_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[0, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_build_and_run_match_onnxruntime(
    fake_gpu: FakeGpu, tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path: Path
):
    cache = tmp_path / "timing.cache"
    engine = build_engine_dir(
        BuildConfig(
            onnx_path=tiny_bert_onnx,
            output=tmp_path / "trt",
            backend="tensorrt",
            device=Device("cuda", 0),
            opt_shapes={"input_ids": [4, 16]},
            max_shapes={"input_ids": [8, 64]},
            timing_cache=cache,
        )
    )
    manifest = engine.manifest
    assert manifest.backend == "tensorrt" and manifest.engine_file == "engine.plan"
    assert manifest.versions["tensorrt"] == "10.13.3.9"
    assert manifest.device == {
        "kind": "cuda",
        "name": "Fake GPU (test double)",
        "compute_capability": "9.0",
    }
    assert manifest.profile["input_ids"].max == [8, 64]
    assert manifest.profile["attention_mask"].opt == [4, 16]
    assert cache.is_file() and manifest.build_options["timing_cache"] == str(cache)
    assert sorted(p.name for p in engine.path.iterdir()) == sorted(
        ["build_log.json", "engine.plan", "manifest.json", "config.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "trtpipe_export.json"]
    )  # fmt: skip

    reference = OnnxRuntimeRunner(EngineDir(tiny_bert_engine), Device("cpu"))
    trt_runner = runner_for(engine, Device("cuda", 0))
    assert type(trt_runner).__name__ == "TensorRTRunner"
    state = fake_gpu.state
    with reference, trt_runner:
        mallocs = state.mallocs
        for batch, seq in ((1, 5), (8, 64), (3, 17)):
            feeds = bert_feeds(batch, seq, seed=batch)
            syncs = state.synchronizations
            got = trt_runner.infer(feeds)
            assert state.synchronizations == syncs + 1
            want = reference.infer(feeds)
            assert sorted(got) == sorted(want) == ["last_hidden_state"]
            for name in want:
                assert got[name].shape == want[name].shape
                np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)
        assert state.mallocs == mallocs  # buffers sized for the profile max at load, reused
    assert fake_gpu.leaks() == {"device": 0, "host": 0, "streams": 0}


def test_onnxruntime_engine_is_refused_by_the_tensorrt_runner(
    fake_gpu: FakeGpu, tiny_bert_engine: Path
):
    from trtpipe.runners.tensorrt import TensorRTRunner

    with pytest.raises(EngineMismatchError, match="built for onnxruntime, not tensorrt; rebuild"):
        TensorRTRunner(EngineDir(tiny_bert_engine), Device("cuda", 0))


def test_cli_build_tensorrt(fake_gpu: FakeGpu, tiny_bert_onnx: Path, tmp_path: Path):
    out = tmp_path / "engine"
    result = CliRunner().invoke(
        cli,
        ["build", str(tiny_bert_onnx), "-o", str(out), "--backend", "tensorrt",
         "--opt-shapes", "input_ids:2x16", "--max-shapes", "input_ids:4x32",
         "--opt-level", "2", "--workspace-mb", "256"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (tensorrt, fp32)" in result.stdout
    manifest = EngineDir(out).manifest
    assert manifest.profile["input_ids"].max == [4, 32]
    assert manifest.build_options["optimization_level"] == 2
    assert manifest.build_options["workspace_mb"] == 256
    # What the builder itself received, not only what the manifest says.
    (received,) = fake_gpu.trt.BUILDS
    assert received["optimization_level"] == 2
    assert received["workspace"] == 256 << 20
    assert received["profile"]["input_ids"] == [[1, 1], [2, 16], [4, 32]]


def test_cli_build_unsupported_op_is_one_clear_line(
    fake_gpu: FakeGpu, tiny_bert_onnx: Path, tmp_path: Path
):
    import onnx

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bert_onnx.parent, model_dir)
    model = onnx.load(str(model_dir / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Gather")
    node.op_type = "FancyGather"
    onnx.save(model, str(model_dir / "model.onnx"))
    result = CliRunner().invoke(
        cli, ["build", str(model_dir / "model.onnx"), "-o", str(tmp_path / "e"), "--backend",
              "tensorrt"],
    )  # fmt: skip
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: TensorRT could not parse model.fp32.onnx: node ")
    assert f"{node.name} (FancyGather): No importer registered for op: FancyGather" in lines[-1]
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing half-written


def test_cli_build_tensorrt_without_gpu(tiny_bert_onnx: Path, tmp_path: Path):
    with installed_fakes(device_count=0):
        result = CliRunner().invoke(
            cli, ["build", str(tiny_bert_onnx), "-o", str(tmp_path / "e"), "--backend", "tensorrt"]
        )
    assert result.exit_code == 2
    assert result.stderr.count("error:") == 1 and "--backend onnxruntime" in result.stderr
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(("precision", "min_cosine"), [("fp16", 0.999), ("int8", 0.97)])
def test_typed_graphs_build_and_run(
    precision: str, min_cosine: float, tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path: Path
):
    """AutoCast FP16 and ModelOpt Q/DQ INT8 graphs parse into the strongly typed network.

    The precision transform runs before the fakes go in (ModelOpt probes for ``tensorrt`` when
    imported); the typed graph is then built as-is, as TensorRT 11 requires.
    """
    import onnx

    from trtpipe.build import calibration_feeds
    from trtpipe.build.profile import build_profile, onnx_io_specs
    from trtpipe.precision import apply_precision
    from trtpipe.text import sample_texts

    inputs, _ = onnx_io_specs(onnx.load(str(tiny_bert_onnx)))
    profile = build_profile(inputs, {}, {"input_ids": [2, 16]}, {"input_ids": [8, 64]}, 128)
    typed_dir = tmp_path / "typed"
    shutil.copytree(tiny_bert_onnx.parent, typed_dir)
    calibration = calibration_feeds(tiny_bert_onnx.parent, sample_texts(), inputs, profile)
    apply_precision(tiny_bert_onnx, typed_dir / "model.onnx", precision, "tensorrt", calibration)
    op_types = {node.op_type for node in onnx.load(str(typed_dir / "model.onnx")).graph.node}
    assert ("QuantizeLinear" in op_types) == (precision == "int8")

    feeds = bert_feeds(4, 20)
    with installed_fakes() as gpu:
        engine = build_engine_dir(
            BuildConfig(
                onnx_path=typed_dir / "model.onnx",
                output=tmp_path / "engine",
                backend="tensorrt",
                device=Device("cuda", 0),
                max_shapes={"input_ids": [8, 64]},
            )
        )
        with runner_for(engine, Device("cuda", 0)) as trt_runner:
            got = trt_runner.infer(feeds)["last_hidden_state"]
        (received,) = gpu.trt.BUILDS
    # The strongly typed network the builder got carries the precision; its I/O stays as the
    # model's (int64 ids in, fp32 hidden states out).
    graph = onnx.load_from_string(received["onnx_bytes"]).graph
    assert received["inputs"] == dict.fromkeys(
        ["input_ids", "attention_mask", "token_type_ids"], "INT64"
    )
    assert received["outputs"] == {"last_hidden_state": "FLOAT"}
    fp16_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    ops = [node.op_type for node in graph.node]
    if precision == "fp16":
        assert len(fp16_weights) >= 10, len(fp16_weights)  # the MatMul weights at least
        assert "QuantizeLinear" not in ops
    else:
        assert ops.count("QuantizeLinear") >= 6 and ops.count("DequantizeLinear") >= 6
    with OnnxRuntimeRunner(EngineDir(tiny_bert_engine), Device("cpu")) as reference:
        want = reference.infer(feeds)["last_hidden_state"]
    a, b = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert got.dtype == np.float32 and got.shape == (4, 20, 32)
    assert cosine.min() >= min_cosine, cosine.min()


def test_fp32_build_of_a_model_with_external_data(
    fake_gpu: FakeGpu, tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path: Path
):
    """Weights in ``model.onnx_data`` (as every export over 2 GB has them): the TensorRT build
    parses with the weights beside the graph, and the engine computes what ONNX Runtime does."""
    import onnx

    export = tmp_path / "export"
    shutil.copytree(tiny_bert_onnx.parent, export)
    model = onnx.load(str(export / "model.onnx"))
    onnx.save_model(
        model, str(export / "model.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0,
    )  # fmt: skip
    assert (export / "model.onnx").stat().st_size < 100_000  # the graph only
    assert (export / "model.onnx_data").stat().st_size > 100_000
    engine = build_engine_dir(
        BuildConfig(
            onnx_path=export / "model.onnx",
            output=tmp_path / "trt",
            backend="tensorrt",
            device=Device("cuda", 0),
            max_shapes={"input_ids": [8, 64]},
        )
    )
    assert not any(p.name.endswith("onnx_data") for p in engine.path.iterdir())
    assert not any(p.name.startswith(".weights") for p in engine.path.iterdir())
    feeds = bert_feeds(3, 17)
    with runner_for(engine, Device("cuda", 0)) as trt_runner:
        got = trt_runner.infer(feeds)["last_hidden_state"]
    with OnnxRuntimeRunner(EngineDir(tiny_bert_engine), Device("cpu")) as reference:
        want = reference.infer(feeds)["last_hidden_state"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
