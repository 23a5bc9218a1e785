"""Output specs advertise the dims ONNX shape inference can fix, not the exporter's symbols."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from trtpipe.build import with_inferred_output_shapes
from trtpipe.build.profile import onnx_io_specs


def pooled_model() -> object:
    """x [batch, seq, 16] -> MatMul(16x8) -> ReduceMean over seq -> y declared [batch, dim_1]."""
    weight = numpy_helper.from_array(np.ones((16, 8), dtype=np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("ReduceMean", ["h", "axes"], ["y"], keepdims=0),
            helper.make_node("Identity", ["h"], ["tokens"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "seq", 16])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", "Div_dim_1"]),
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch_size", "seq", 8]),
        ],
        [weight, axes],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_symbolic_feature_dim_becomes_its_inferred_size() -> None:
    model = pooled_model()
    _, declared = onnx_io_specs(model)
    assert declared[0].shape == [-1, -1]
    refined = with_inferred_output_shapes(model, declared)
    assert [(s.name, s.shape, s.dims) for s in refined] == [
        ("y", [-1, 8], ["batch", ""]),
        ("tokens", [-1, -1, 8], ["batch", "sequence", ""]),
    ]


def test_specs_kept_when_inference_cannot_run() -> None:
    _, declared = onnx_io_specs(pooled_model())
    assert with_inferred_output_shapes(object(), declared) == declared
