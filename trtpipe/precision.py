"""Precision lives in the ONNX graph (TensorRT 11 is strongly typed only).

- fp16: ModelOpt AutoCast, which keeps overflow-prone ops (LayerNorm, Softmax, Pow, reductions)
  in FP32, checked against real tokenized reference inputs (not random int64 ids).
- int8 for TensorRT: explicit symmetric Q/DQ via ModelOpt ``quantize`` with calibration data.
- int8 for ONNX Runtime on CPU: per-channel dynamic quantization of MatMul weights (fast on CPU
  and accurate: activations are quantized per batch at run time).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.errors import BuildError, InputError

log = logging.getLogger(__name__)


def apply_precision(
    src: Path,
    dst: Path,
    precision: str,
    backend: str,
    calibration: dict[str, np.ndarray] | None,
) -> dict[str, Any]:
    """Write ``dst`` with ``precision`` applied to ``src``; return what was done."""
    if precision == "fp32":
        shutil.copyfile(src, dst)
        return {"method": "none"}
    if precision == "fp16":
        return to_fp16(src, dst, calibration)
    if precision == "int8":
        if not calibration:
            raise InputError("--int8 needs calibration text (--calib FILE, one sentence a line)")
        if backend == "tensorrt":
            return to_int8_qdq(src, dst, calibration)
        return to_int8_dynamic(src, dst)
    raise InputError(f"unknown precision {precision!r}; use fp32, fp16 or int8")


def to_fp16(src: Path, dst: Path, calibration: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """ModelOpt AutoCast with real reference inputs; I/O types kept so clients see no change."""
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    with tempfile.TemporaryDirectory() as work:
        calib_path = None
        if calibration:
            calib_path = str(Path(work) / "calib.npz")
            np.savez(calib_path, **calibration)  # type: ignore[arg-type]
        try:
            model = convert_to_mixed_precision(
                onnx_path=str(src),
                low_precision_type="fp16",
                keep_io_types=True,
                calibration_data=calib_path,
            )
        except Exception as exc:  # ModelOpt raises assorted types
            raise BuildError(f"FP16 conversion failed: {exc}") from exc
    onnx.save(model, str(dst))
    return {"method": "modelopt.autocast", "keep_io_types": True}


def to_int8_qdq(src: Path, dst: Path, calibration: dict[str, np.ndarray]) -> dict[str, Any]:
    """Explicit Q/DQ (symmetric, per-channel weights) for TensorRT's strongly typed builder."""
    from modelopt.onnx.quantization import quantize

    try:
        quantize(
            str(src),
            quantize_mode="int8",
            calibration_data=calibration,
            calibration_method="entropy",
            calibration_eps=["cpu"],
            high_precision_dtype="fp32",
            output_path=str(dst),
            log_level="WARNING",
        )
    except Exception as exc:
        raise BuildError(f"INT8 Q/DQ quantization failed: {exc}") from exc
    return {"method": "modelopt.quantize", "calibration": "entropy", "qdq": True}


def to_int8_dynamic(src: Path, dst: Path) -> dict[str, Any]:
    """ONNX Runtime dynamic quantization, per-channel MatMul weights (CPU fast path)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    except Exception as exc:
        raise BuildError(f"INT8 dynamic quantization failed: {exc}") from exc
    return {"method": "onnxruntime.quantize_dynamic", "ops": ["MatMul"], "per_channel": True}


def op_precision_counts(path: Path) -> dict[str, Any]:
    """Per-op-type and per-dtype node counts, for the build log."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    with contextlib.suppress(Exception):  # shape inference is best effort for the log
        model = onnx.shape_inference.infer_shapes(model)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    dtypes.update({v.name: v.type.tensor_type.elem_type for v in model.graph.output})
    names = {1: "float32", 10: "float16", 3: "int8", 2: "uint8", 7: "int64", 6: "int32", 9: "bool"}
    by_dtype: collections.Counter[str] = collections.Counter()
    by_op: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        by_op[node.op_type] += 1
        elem = dtypes.get(node.output[0]) if node.output else None
        by_dtype[names.get(elem or 0, "unknown")] += 1
    return {"nodes": len(model.graph.node), "by_output_dtype": dict(by_dtype), "by_op": dict(by_op)}
