"""AutoCast's fp16 range check for models whose weights live in external data.

ModelOpt AutoCast keeps a node in fp32 when one of its inputs or outputs passes ``data_max``
(512) on a reference run. Its own reference run deep-copies the loaded model to mark every
tensor as an output, copies it again to save it for ONNX Runtime, and the session loads the
weights once more: several times the model's size, more than a 24 GiB machine has for a
2.3 GB decoder. This module runs the same check with a probe graph written beside the
weights (ONNX Runtime reads them from the file, the graph has no copy of them), one
calibration row at a time, keeping only each tensor's absolute maximum. The result is handed
to AutoCast as its own ``IORangeRule`` over those maxima, so the decision is AutoCast's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# modelopt.onnx.autocast.convert.DEFAULT_DATA_MAX: I/O beyond this stays in fp32.
DATA_MAX = 512.0


def tensor_absmax(
    src: Path, calibration: dict[str, np.ndarray], chunk: int = 128
) -> dict[str, np.ndarray]:
    """Absolute maximum of every node output and graph input over ``calibration``.

    Each value is a one-element array (an empty one for an empty or non-numeric tensor), the
    form AutoCast's ``IORangeRule`` reads. The whole batch runs at once, as AutoCast runs it
    (shape values such as batch x length must be the batch's own), but the outputs are asked
    for ``chunk`` at a time, so memory holds a slice of the activations, not all of them.
    """
    import onnx
    import onnxruntime as ort

    probe = onnx.load(str(src), load_external_data=False)
    # Constant nodes' outputs are weights, not data: AutoCast's run does not see them either.
    names = [o for node in probe.graph.node if node.op_type != "Constant" for o in node.output if o]
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    probe_path = src.parent / f".fp16-probe.{os.getpid()}.{src.name}"
    onnx.save_model(probe, str(probe_path))
    del probe
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(probe_path), options, providers=["CPUExecutionProvider"])
    finally:
        probe_path.unlink(missing_ok=True)
    wanted = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in calibration.items() if k in wanted}
    absmax = {name: _absmax(value) for name, value in feeds.items()}
    for start in range(0, len(names), chunk):
        part = names[start : start + chunk]
        for name, value in zip(part, session.run(part, feeds), strict=True):
            absmax[name] = _absmax(np.asarray(value))
    del session
    return {
        name: np.array([], np.float64) if value is None else np.array([value])
        for name, value in absmax.items()
    }


def range_rule(src: Path, calibration: dict[str, np.ndarray]) -> Any:
    """AutoCast's I/O range rule over maxima measured with the weights read in place."""
    from modelopt.onnx.autocast.nodeclassifier import IORangeRule

    absmax = tensor_absmax(src, calibration)
    out_of_range = sum(1 for v in absmax.values() if v.size and v[0] > DATA_MAX)
    log.info("fp16 range check: %d of %d tensors pass %g", out_of_range, len(absmax), DATA_MAX)
    return IORangeRule(DATA_MAX, absmax, {})


def _absmax(value: np.ndarray) -> float | None:
    if value.size == 0 or not np.issubdtype(value.dtype, np.number):
        return None
    return float(np.max(np.abs(value.astype(np.float64, copy=False))))
