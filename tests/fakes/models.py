"""Tiny hand-made ONNX graphs and engine dirs for tests of the TensorRT path under the fakes."""

from __future__ import annotations

from pathlib import Path

from trtpipe.build import BuildConfig
from trtpipe.devices import Device
from trtpipe.engine import Manifest, ShapeRange, TensorSpec, write_manifest

PROFILE = {"x": ShapeRange([1, 4], [2, 4], [8, 4])}


def save_double_model(path: Path, op: str = "Mul") -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["batch_size", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", 4])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node(op, ["xf", "two"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(nodes, "double", [x], [y], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def build_dir(tmp_path: Path, timing_cache: Path | None = None, op: str = "Mul") -> Path:
    """An engine dir built by build_tensorrt under the fakes, with a hand-written manifest."""
    from trtpipe.build.tensorrt import build_tensorrt

    out = tmp_path / "engine"
    onnx_path = save_double_model(out / "model.onnx", op)
    config = BuildConfig(
        onnx_path=onnx_path, output=out, device=Device("cuda", 0), timing_cache=timing_cache
    )
    engine_file, info = build_tensorrt(onnx_path, out, PROFILE, config)
    manifest = Manifest(
        task="feature-extraction",
        backend="tensorrt",
        precision="fp32",
        engine_file=engine_file,
        inputs=[TensorSpec("x", "int64", [-1, 4], ["batch", ""])],
        outputs=[TensorSpec("y", "float32", [-1, 4], ["batch", ""])],
        profile=PROFILE,
        versions=info["versions"],
        device=info["device"],
    )
    write_manifest(out, manifest)
    return out
