"""ONNX files that are not Hugging Face exports: build detects task "tensor", compare gates them
against the source ONNX on ONNX Runtime fp32 (random inputs in the profile or an .npz)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.tensor_models import matmul_relu_weight, save_matmul_relu
from trtpipe.cli.main import cli
from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.runners.onnxruntime import OnnxRuntimeRunner


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tensor_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tensor")
    onnx_path = save_matmul_relu(root / "plain" / "mm.onnx")
    code, output = invoke("build", str(onnx_path), "-o", str(root / "engine"))
    assert code == 0, output
    return root / "engine"


def test_plain_onnx_builds_as_tensor_engine(tensor_engine: Path):
    manifest = EngineDir(tensor_engine).manifest
    assert manifest.task == "tensor"
    assert manifest.library == "onnx"
    assert manifest.source_model.endswith("mm.onnx")
    # The exporter-less dim "N" is the batch; the default batch range applies.
    assert manifest.inputs[0].dims == ["batch", ""]
    assert manifest.profile["x"].min == [1, 4] and manifest.profile["x"].max == [32, 4]
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    with OnnxRuntimeRunner(EngineDir(tensor_engine), Device("cpu", 0)) as runner:
        y = runner.infer({"x": x})["y"]
    np.testing.assert_allclose(y, np.maximum(x @ matmul_relu_weight(), 0), atol=1e-5)


def test_task_flag_overrides_detection(tmp_path: Path):
    onnx_path = save_matmul_relu(tmp_path / "mm.onnx")
    code, output = invoke(
        "build", str(onnx_path), "-o", str(tmp_path / "e"), "--task", "text-classification"
    )
    # Not a tensor engine now, so "N" has no known role: the profile must say it.
    assert code == 2 and "dynamic dim 0 of unknown role" in output
    code, output = invoke(
        "build",
        str(onnx_path),
        "-o",
        str(tmp_path / "e"),
        "--task",
        "text-classification",
        "--max-shapes",
        "x:16x4",
    )
    assert code == 0, output
    manifest = EngineDir(tmp_path / "e").manifest
    assert manifest.task == "text-classification"
    assert manifest.profile["x"].max == [16, 4]


def test_dynamic_dims_of_unknown_role_take_the_given_shapes(tmp_path: Path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["img"], ["out"])],
        "relu",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, "H", "W"])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "r.onnx"
    )
    code, output = invoke("build", str(tmp_path / "r.onnx"), "-o", str(tmp_path / "a"))
    assert code == 2 and "dynamic dim 2 of unknown role" in output
    code, output = invoke(
        "build",
        str(tmp_path / "r.onnx"),
        "-o",
        str(tmp_path / "b"),
        "--min-shapes",
        "img:1x3x8x8",
        "--max-shapes",
        "img:4x3x64x32",
    )
    assert code == 0, output
    shape_range = EngineDir(tmp_path / "b").manifest.profile["img"]
    assert (shape_range.min, shape_range.opt, shape_range.max) == (
        [1, 3, 8, 8],
        [4, 3, 64, 32],
        [4, 3, 64, 32],
    )


def test_compare_gates_against_the_source_onnx(tensor_engine: Path, tmp_path: Path):
    code, output = invoke("compare", str(tensor_engine), "--random", "40", "--batch-size", "16")
    assert code == 0, output
    assert "PASSED (fp32, 40 samples, random inputs in the profile" in output
    # Another graph as the reference (other weights): the gate must fail, naming the output.
    other = save_matmul_relu(tmp_path / "other.onnx", weight_seed=7)
    code, output = invoke("compare", str(tensor_engine), "--reference", str(other))
    assert code == 1
    assert "y: max_abs" in output and "FAILED (fp32, 64 samples" in output


def test_compare_with_npz_inputs(tensor_engine: Path, tmp_path: Path):
    x = np.random.default_rng(3).standard_normal((20, 4)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    code, output = invoke(
        "compare",
        str(tensor_engine),
        "--inputs",
        str(tmp_path / "in.npz"),
        "--json",
        str(tmp_path / "r.json"),
    )
    assert code == 0, output
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples"] == 20 and report["outputs"]["y"]["max_abs"] <= 1e-4
    np.savez(tmp_path / "bad.npz", x=x.astype(np.float64))
    code, output = invoke("compare", str(tensor_engine), "--inputs", str(tmp_path / "bad.npz"))
    assert code == 2 and "'x' is float64, the engine takes float32" in output
    np.savez(tmp_path / "wide.npz", x=np.zeros((2, 5), np.float32))
    code, output = invoke("compare", str(tensor_engine), "--inputs", str(tmp_path / "wide.npz"))
    assert code == 2 and "outside the engine profile" in output


def test_compare_refuses_a_changed_source(tmp_path: Path):
    onnx_path = save_matmul_relu(tmp_path / "src" / "mm.onnx")
    code, _ = invoke("build", str(onnx_path), "-o", str(tmp_path / "e"))
    assert code == 0
    save_matmul_relu(onnx_path, weight_seed=9)  # the file changed after the build
    code, output = invoke("compare", str(tmp_path / "e"))
    assert code == 2 and "changed since" in output
