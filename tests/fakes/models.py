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


def write_shape_only_decoder(
    out: Path,
    layers: int,
    kv_heads: int,
    head_dim: int,
    vocab: int,
    kv_dtype: str,
    max_positions: int,
) -> Path:
    """A decoder engine dir with the I/O of a real LLM export but no weights or graph.

    The plan holds only the fake TensorRT header (I/O names, dtypes, shapes, the default
    profile trtpipe's build would pick), enough to load a runner and count its memory; it must
    never be launched. Dims carry optimum's names, so the profile comes from ``build_profile``.
    """
    import json

    from tests.fakes import tensorrt as trt
    from trtpipe.build.profile import build_profile

    kv_trt = {"float16": trt.DataType.HALF, "float32": trt.DataType.FLOAT}[kv_dtype]
    batch, seq, past = "batch_size", "sequence_length", "past_sequence_length"
    total = "past_sequence_length + sequence_length"
    inputs = [
        TensorSpec("input_ids", "int64", [-1, -1], [batch, seq]),
        TensorSpec("attention_mask", "int64", [-1, -1], [batch, total]),
        TensorSpec("position_ids", "int64", [-1, -1], [batch, seq]),
    ]
    outputs = [TensorSpec("logits", "float32", [-1, -1, vocab], [batch, seq, ""])]
    for layer in range(layers):
        for kind in ("key", "value"):
            shape, dims = [-1, kv_heads, -1, head_dim], [batch, "", past, ""]
            inputs.append(TensorSpec(f"past_key_values.{layer}.{kind}", kv_dtype, shape, dims))
            present = [batch, "", total, ""]
            outputs.append(TensorSpec(f"present.{layer}.{kind}", kv_dtype, shape, present))
    manifest_inputs, manifest_outputs = _with_kinds(inputs), _with_kinds(outputs)
    profile = build_profile(manifest_inputs, {}, {}, {}, max_positions)
    trt_dtype = {"int64": trt.DataType.INT64, "float32": trt.DataType.FLOAT, kv_dtype: kv_trt}
    header = {
        "version": trt.__version__,
        "capability": list(trt.cuda_runtime.STATE.capability),
        "profile": {name: [r.min, r.opt, r.max] for name, r in profile.items()},
        "io": [
            {
                "name": spec.name,
                "mode": int(mode),
                "dtype": int(trt_dtype[spec.dtype]),
                "shape": spec.shape,
                "dims": spec.dims,
            }
            for mode, specs in (
                (trt.TensorIOMode.INPUT, inputs),
                (trt.TensorIOMode.OUTPUT, outputs),
            )
            for spec in specs
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.plan").write_bytes(trt.plan_bytes(header, b""))
    (out / "config.json").write_text(json.dumps({"max_position_embeddings": max_positions}))
    manifest = Manifest(
        task="text-generation-with-past",
        backend="tensorrt",
        precision="fp16" if kv_dtype == "float16" else "fp32",
        engine_file="engine.plan",
        inputs=manifest_inputs,
        outputs=manifest_outputs,
        profile=profile,
        versions={"tensorrt": trt.__version__},
        device={"kind": "cuda", "compute_capability": "9.0"},
    )
    write_manifest(out, manifest)
    return out


def _with_kinds(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Specs as the manifest keeps them: dim kinds (batch, sequence, ...) instead of names."""
    from trtpipe.build.profile import dim_kind

    return [
        TensorSpec(s.name, s.dtype, s.shape, [dim_kind(d) if d else "" for d in s.dims])
        for s in specs
    ]


TOY_VOCAB = 37


def save_toy_decoder(path: Path, kv_dtype: int) -> Path:
    """A one-layer "decoder" whose next token depends on the whole KV cache (no weights).

    present.0.key/value = past ++ [id, id] per new token (``kv_dtype``: ONNX FLOAT or FLOAT16),
    logits[b, s, v] = -|v - (sum of present key[b]) mod V|, so greedy decoding yields
    ``sum(2 * every token fed so far) mod V``: any cache the runner loses or misplaces changes
    the tokens.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    batch, seq, past, total = (
        "batch_size",
        "sequence_length",
        "past_sequence_length",
        ("past_sequence_length + sequence_length"),
    )
    kv = [batch, 1, past, 2]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total]),
        helper.make_tensor_value_info("past_key_values.0.key", kv_dtype, kv),
        helper.make_tensor_value_info("past_key_values.0.value", kv_dtype, kv),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, TOY_VOCAB]),
        helper.make_tensor_value_info("present.0.key", kv_dtype, [batch, 1, total, 2]),
        helper.make_tensor_value_info("present.0.value", kv_dtype, [batch, 1, total, 2]),
    ]
    constants = [
        numpy_helper.from_array(np.array([1, 3], np.int64), "axes13"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes123"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.arange(TOY_VOCAB, dtype=np.float32), "vocab"),
        numpy_helper.from_array(np.array(TOY_VOCAB, np.float32), "vocab_size"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["input_ids", "axes13"], ["ids4"]),  # [B,1,S,1]
        helper.make_node("Concat", ["ids4", "ids4"], ["pair"], axis=3),  # [B,1,S,2]
        helper.make_node("Cast", ["pair"], ["new_kv"], to=kv_dtype),
        helper.make_node("Concat", ["past_key_values.0.key", "new_kv"], ["present.0.key"], axis=2),
        helper.make_node(
            "Concat", ["past_key_values.0.value", "new_kv"], ["present.0.value"], axis=2
        ),
        helper.make_node("Cast", ["present.0.key"], ["key32"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["key32", "axes123"], ["sum"], keepdims=1),  # [B,1,1,1]
        helper.make_node("Squeeze", ["sum", "axis2"], ["sum3"]),  # [B,1,1]
        helper.make_node("Mod", ["sum3", "vocab_size"], ["target"], fmod=1),
        helper.make_node("Sub", ["vocab", "target"], ["diff"]),  # [B,1,V]
        helper.make_node("Abs", ["diff"], ["dist"]),
        helper.make_node("Neg", ["dist"], ["score"]),
        helper.make_node("Unsqueeze", ["input_ids", "axis2"], ["ids3"]),  # [B,S,1]
        helper.make_node("Cast", ["ids3"], ["ids3f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids3f", "zero"], ["zeros"]),
        helper.make_node("Add", ["score", "zeros"], ["logits"]),  # [B,S,V]
    ]
    graph = helper.make_graph(nodes, "toy_decoder", inputs, outputs, constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_toy_decoder(out: Path, kv_dtype: str = "float16", max_total: int = 16) -> Path:
    """The toy decoder built by build_tensorrt under the fakes, with its manifest."""
    import onnx

    from trtpipe.build.profile import onnx_io_specs
    from trtpipe.build.tensorrt import build_tensorrt

    onnx_type = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT}
    onnx_path = save_toy_decoder(out / "model.onnx", onnx_type[kv_dtype])
    inputs, outputs = onnx_io_specs(onnx.load(str(onnx_path)))
    kv = ShapeRange([1, 1, 0, 2], [2, 1, 4, 2], [4, 1, max_total - 1, 2])
    profile = {
        "input_ids": ShapeRange([1, 1], [2, 4], [4, 8]),
        "attention_mask": ShapeRange([1, 1], [2, 8], [4, max_total]),
        "past_key_values.0.key": kv,
        "past_key_values.0.value": kv,
    }
    config = BuildConfig(onnx_path=onnx_path, output=out, device=Device("cuda", 0))
    engine_file, info = build_tensorrt(onnx_path, out, profile, config)
    onnx_path.unlink()
    manifest = Manifest(
        task="text-generation-with-past",
        backend="tensorrt",
        precision="fp16" if kv_dtype == "float16" else "fp32",
        engine_file=engine_file,
        inputs=inputs,
        outputs=outputs,
        profile=profile,
        versions=info["versions"],
        device=info["device"],
    )
    write_manifest(out, manifest)
    return out


def toy_greedy(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """What the toy decoder generates greedily: each token is 2 * (sum of all fed) mod V."""
    results = []
    for prompt in prompts:
        fed, out = list(prompt), []
        for _ in range(new_tokens):
            token = (2 * sum(fed)) % TOY_VOCAB
            out.append(token)
            fed.append(token)
        results.append(out)
    return results
