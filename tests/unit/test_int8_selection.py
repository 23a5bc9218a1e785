"""End-to-end INT8 node selection on a small two-MatMul graph with one badly quantizing node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtpipe.errors import InputError
from trtpipe.int8_selection import select_fp32_nodes, switchable_model, tail_and_min
from trtpipe.precision import int8_recipe, quantize_dynamic_int8, to_int8_dynamic, weighted_nodes


def two_matmuls(path: Path) -> onnx.ModelProto:
    """x -> MatMul(w1) -> Relu -> MatMul(w2) -> y; w2 has one huge column that wrecks int8."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 32)).astype(np.float32)
    w2 = rng.normal(size=(32, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="second"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return model


def feeds(rows: int = 64) -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).normal(size=(rows, 16)).astype(np.float32)
    x[:, 3] *= 60  # an outlier channel: per-tensor activation scales suffer on "second"'s input
    return {"x": x}


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture()
def models(tmp_path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    fp32 = two_matmuls(tmp_path / "fp32.onnx")
    quantize_dynamic_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", [])
    return fp32, onnx.load(str(tmp_path / "int8.onnx"))


def test_switches_reproduce_fp32_and_int8_exactly(
    models: tuple[onnx.ModelProto, onnx.ModelProto],
) -> None:
    fp32, quantized = models
    nodes = weighted_nodes(fp32)
    assert [n.name for n in nodes] == ["first", "second"]
    model, switches = switchable_model(fp32, quantized, nodes)
    assert switches == ["first/use_int8", "second/use_int8"]
    x = feeds()
    both = session(model)

    def run(first: bool, second: bool) -> np.ndarray:
        flags = {"first/use_int8": np.array(first), "second/use_int8": np.array(second)}
        return both.run(["y"], {**x, **flags})[0]

    want_fp32 = session(fp32).run(["y"], x)[0]
    want_int8 = session(quantized).run(["y"], x)[0]
    assert np.allclose(run(False, False), want_fp32, rtol=1e-5, atol=1e-5)
    assert np.allclose(run(True, True), want_int8, rtol=1e-5, atol=1e-5)
    mixed = run(True, False)
    assert not np.allclose(mixed, want_fp32, atol=1e-4)
    assert not np.allclose(mixed, want_int8, atol=1e-4)


def test_greedy_keeps_the_node_that_hurts_most_then_stops(
    models: tuple[onnx.ModelProto, onnx.ModelProto],
) -> None:
    fp32, quantized = models
    nodes = weighted_nodes(fp32)
    chosen = select_fp32_nodes(fp32, quantized, nodes, feeds(), target=1.0, budget=1)
    assert chosen.kept_fp32 == ["first"]  # the outlier channel feeds "first"
    assert chosen.cosine_min > chosen.cosine_min_all_int8
    assert chosen.evaluations == 2 + 2
    assert chosen.steps[0]["keep_fp32"] == "first"
    # A target already met keeps everything quantized and tries nothing.
    met = select_fp32_nodes(
        fp32, quantized, nodes, feeds(), target=chosen.cosine_min_all_int8, budget=2
    )
    assert met.kept_fp32 == [] and met.evaluations == 2


def test_tail_and_min() -> None:
    rows = [np.linspace(0.9, 1.0, 100), np.array([0.95, 0.99])]
    tail, worst = tail_and_min(rows, tail=0.02)
    assert worst == pytest.approx(0.9)
    assert tail == pytest.approx((0.9 + 0.9 + 0.1 / 99) / 2)


@pytest.mark.parametrize(
    ("family", "weight_type"),
    [("avx2", "uint8"), ("avx512bw", "uint8"), ("avx512vnni", "int8"), ("amx", "int8")],
)
def test_recipe_uses_u8u8_where_u8s8_saturates(family: str, weight_type: str) -> None:
    recipe = int8_recipe(family)
    assert recipe["cpu_family"] == family
    assert recipe["weight_type"] == weight_type
    assert recipe["reduce_range"] is False


@pytest.mark.parametrize(("weight_type", "dtype"), [("int8", np.int8), ("uint8", np.uint8)])
def test_weight_type_reaches_the_quantized_graph(
    tmp_path: Path, weight_type: str, dtype: type
) -> None:
    two_matmuls(tmp_path / "fp32.onnx")
    quantize_dynamic_int8(tmp_path / "fp32.onnx", tmp_path / "q.onnx", [], weight_type)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    weights = [numpy_helper.to_array(i) for i in quantized.graph.initializer]
    assert {w.dtype for w in weights if w.ndim == 2} == {np.dtype(dtype)}
    assert [n.op_type for n in quantized.graph.node].count("MatMulInteger") == 2
    with pytest.raises(InputError, match="weight type"):
        to_int8_dynamic(tmp_path / "fp32.onnx", tmp_path / "x.onnx", feeds(), weight_type="int4")


def test_proxy_selection_and_smoothing_paths(tmp_path: Path) -> None:
    """The local-error proxy and SmoothQuant smoothing (trtpipe.int8_proxy) still plug in."""
    two_matmuls(tmp_path / "fp32.onnx")
    proxy = to_int8_dynamic(
        tmp_path / "fp32.onnx", tmp_path / "p.onnx", feeds(), selection="proxy", keep_fraction=0.5
    )
    assert proxy["selection"] == "proxy" and proxy["kept_fp32"] == ["first"]
    smoothed = to_int8_dynamic(
        tmp_path / "fp32.onnx",
        tmp_path / "s.onnx",
        feeds(),
        alpha=0.5,
        keep_fp32=[],
    )
    assert smoothed["smoothed_nodes"] == 2 and smoothed["selection"] == "given"
    want = session(onnx.load(str(tmp_path / "fp32.onnx"))).run(["y"], feeds())[0]
    got = session(onnx.load(str(tmp_path / "s.onnx"))).run(["y"], feeds())[0]
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert 0.9 < cosine < 1.0
