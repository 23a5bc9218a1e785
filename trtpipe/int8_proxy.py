"""The cheaper int8 heuristics: a local per-node error proxy and SmoothQuant-style smoothing.

Both work from the fp32 activations captured on the calibration text. ``trtpipe.precision``
uses the proxy for ``--int8-select proxy`` (and as the fallback when the end-to-end greedy
selection cannot run) and smoothing when ``alpha`` > 0; measured on MiniLM in
docs/precision.md, neither is the default.
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

# SmoothQuant migration strength: scale = amax(x)^alpha / amax(w)^(1 - alpha), per input channel.
# 0 disables it: measured, it helps the built-in sentences but not text unlike the calibration.
SMOOTH_ALPHA = 0.0
# Share of quantizable nodes kept in fp32 by the local proxy, the ones with the largest INT8 error.
KEEP_FP32_FRACTION = 0.2

log = logging.getLogger(__name__)


def capture_rows(
    model: Any,
    names: list[str],
    feeds_list: list[dict[str, np.ndarray]],
    source: Path | None = None,
) -> dict[str, np.ndarray]:
    """The named tensors as (rows, channels) over real tokens of the calibration feeds.

    ``source``: the file ``model`` was loaded from; when its weights are external data, the
    probe graph is written beside it and reads them in place (no second copy of the weights
    in memory, no 2 GB protobuf limit).
    """
    import onnx
    import onnxruntime as ort

    from trtpipe.onnx_files import uses_external_data

    file_backed = source is not None and uses_external_data(source)
    probe = onnx.ModelProto()
    if file_backed:
        assert source is not None
        probe = onnx.load(str(source), load_external_data=False)
    else:
        probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if file_backed:
        assert source is not None
        probe_path = source.parent / f".probe.{os.getpid()}.{source.name}"
        onnx.save_model(probe, str(probe_path))
        try:
            session = ort.InferenceSession(
                str(probe_path), options, providers=["CPUExecutionProvider"]
            )
        finally:
            probe_path.unlink(missing_ok=True)
    else:
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    wanted = {i.name for i in session.get_inputs()}
    rows: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for feeds in feeds_list:
        values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
        mask = feeds.get("attention_mask")
        for name, value in zip(names, values, strict=True):
            if mask is not None and value.shape[:2] == mask.shape:
                rows[name].append(value[mask.astype(bool)])
            else:
                rows[name].append(value.reshape(-1, value.shape[-1]))
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def int8_error(x: np.ndarray, weight: np.ndarray) -> float:
    """Relative error of x @ W under dynamic INT8 (uint8 per-tensor x, int8 per-channel W)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    x_scale = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / x_scale)
    xq = (np.clip(np.round(x / x_scale) + zero, 0, 255) - zero) * x_scale
    w_scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127
    wq = np.round(weight / w_scale) * w_scale
    exact = x @ weight
    return float(np.linalg.norm(xq @ wq - exact) / max(float(np.linalg.norm(exact)), 1e-12))


def most_sensitive(
    model: Any,
    feeds_list: list[dict[str, np.ndarray]],
    fraction: float = KEEP_FP32_FRACTION,
    source: Path | None = None,
) -> list[str]:
    """Weighted nodes with the largest INT8 output error on calibration text, kept in fp32.

    A local proxy (each node alone, on its captured fp32 input) for quantizing the node and
    measuring the model outputs: it ranks the same nodes first on MiniLM (FFN projections of
    the first layer and the middle layers' FFN) at a fraction of the cost.
    """
    from onnx import numpy_helper

    nodes = weighted_nodes(model)
    count = round(fraction * len(nodes))
    if count == 0:
        return []
    inits = {i.name: i for i in model.graph.initializer}
    inputs = capture_rows(model, sorted({n.input[0] for n in nodes}), feeds_list, source)
    errors = {
        node.name: int8_error(
            inputs[node.input[0]].astype(np.float32),
            numpy_helper.to_array(inits[node.input[1]]).astype(np.float32),
        )
        for node in nodes
    }
    ranked = sorted(errors, key=lambda name: errors[name], reverse=True)
    log.info("int8 error per node: %s", {n: round(errors[n], 4) for n in ranked[:count]})
    return ranked[:count]


def activation_absmax(
    model: Any, names: list[str], feeds_list: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per-channel max |x| of the named tensors over real tokens of the calibration feeds."""
    return {k: np.abs(v).max(axis=0) for k, v in capture_rows(model, names, feeds_list).items()}


def smooth_activations(
    model: Any, feeds_list: list[dict[str, np.ndarray]], alpha: float = SMOOTH_ALPHA
) -> int:
    """SmoothQuant in place: x @ W == (x / s) @ (s W); returns how many nodes were smoothed.

    A ``Mul`` by 1/s is inserted on each weighted node's input edge only (a residual branch
    reading the same tensor is untouched), and W's rows are scaled by s, so the fp32 graph
    computes the same function while the activation that dynamic quantization sees has its
    outlier channels flattened.
    """
    from onnx import helper, numpy_helper

    targets = weighted_nodes(model)
    if not targets:
        return 0
    inits = {i.name: i for i in model.graph.initializer}
    amax = activation_absmax(model, sorted({n.input[0] for n in targets}), feeds_list)
    target_ids = {id(n) for n in targets}
    nodes = []
    for node in model.graph.node:
        if id(node) in target_ids:
            weight_init = inits[node.input[1]]
            weight = numpy_helper.to_array(weight_init).astype(np.float32)
            x_max = np.maximum(amax[node.input[0]], 1e-5)
            w_max = np.maximum(np.abs(weight).max(axis=1), 1e-5)
            scale = np.clip(x_max**alpha / w_max ** (1 - alpha), 1e-2, 1e2).astype(np.float32)
            weight_init.CopyFrom(numpy_helper.from_array(weight * scale[:, None], weight_init.name))
            base = f"{node.name or node.output[0]}/smooth"
            model.graph.initializer.append(
                numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{base}/inv_scale")
            )
            nodes.append(
                helper.make_node("Mul", [node.input[0], f"{base}/inv_scale"], [base], name=base)
            )
            node.input[0] = base
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(targets)


def weighted_nodes(model: Any) -> list[Any]:
    """MatMul/Attention nodes whose second input is a 2-D weight initializer."""
    shapes = {i.name: len(i.dims) for i in model.graph.initializer}  # no weight copied
    return [
        node
        for node in model.graph.node
        if node.op_type in ("MatMul", "Attention")
        and len(node.input) > 1
        and shapes.get(node.input[1]) == 2
    ]
