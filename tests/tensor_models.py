"""Plain ONNX graphs made with onnx.helper: models that are not Hugging Face exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_matmul_relu(path: Path, weight_seed: int = 0, features: int = 4, out: int = 3) -> Path:
    """``y = relu(x @ W)`` with x ``[N, features]`` (N dynamic, named like no exporter would)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(weight_seed).standard_normal((features, out))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "matmul_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def matmul_relu_weight(weight_seed: int = 0, features: int = 4, out: int = 3) -> np.ndarray:
    return np.random.default_rng(weight_seed).standard_normal((features, out)).astype(np.float32)


def save_add_sub(path: Path, width: int = 16) -> Path:
    """Triton's "simple" model as plain ONNX: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1
    (int32 ``[batch, width]``)."""
    import onnx
    from onnx import TensorProto, helper

    def tensor(name: str) -> object:
        return helper.make_tensor_value_info(name, TensorProto.INT32, ["batch", width])

    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [tensor("INPUT0"), tensor("INPUT1")],
        [tensor("OUTPUT0"), tensor("OUTPUT1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
