"""The TensorRT INT8 form: explicit symmetric Q/DQ from ModelOpt, checked on the tiny BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from trtpipe.build import calibration_feeds
from trtpipe.build.profile import build_profile, onnx_io_specs
from trtpipe.precision import default_calibration_texts, to_int8_qdq


def test_qdq_symmetric_with_zero_points(tiny_bert_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_bert_onnx))
    inputs, _ = onnx_io_specs(model)
    profile = build_profile(inputs, {}, {}, {"input_ids": [8, 64]}, 128)
    calib = calibration_feeds(tiny_bert_onnx.parent, default_calibration_texts(), inputs, profile)
    out = tmp_path / "model.int8.onnx"
    info = to_int8_qdq(tiny_bert_onnx, out, calib)
    assert info["qdq"] is True
    qdq = onnx.load(str(out))
    onnx.checker.check_model(qdq)
    quant = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"]
    dequant = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    assert len(quant) >= 8 and len(dequant) >= len(quant)
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    zero_points = [inits[n.input[2]] for n in quant + dequant if len(n.input) > 2]
    assert zero_points, "Q/DQ nodes carry explicit zero points"
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
