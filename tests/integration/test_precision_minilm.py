"""fp32 / fp16 / int8 MiniLM engines (ONNX Runtime, CPU) against PyTorch, default tolerances."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.compare import Tolerances, compare_engine
from trtpipe.engine import EngineDir

HELDOUT = Path(__file__).parent.parent / "data" / "heldout_sentences.txt"


@pytest.fixture(scope="module")
def engines(minilm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, EngineDir]:
    root = tmp_path_factory.mktemp("minilm-engines")
    return {
        p: build_engine_dir(
            BuildConfig(
                onnx_path=minilm_onnx,
                output=root / p,
                precision=p,
                backend="onnxruntime",
                # Batch 32: the int8 build calibrates on 32 sentences, as by default.
                max_shapes={"input_ids": [32, 256]},
            )
        )
        for p in ("fp32", "fp16", "int8")
    }


def build_record(engine: EngineDir) -> tuple[dict, dict]:
    log = json.loads((engine.path / "build_log.json").read_text())
    return engine.manifest.build_options["precision"], log["op_counts"]


def test_fp32_fused_and_exact(engines: dict[str, EngineDir]) -> None:
    engine = engines["fp32"]
    report = compare_engine(engine, Tolerances.for_precision("fp32"))
    assert report.passed, report.table()
    assert report.outputs["token_embeddings"].max_abs <= 1e-4
    assert report.outputs["sentence_embedding"].max_abs <= 1e-5
    method, _ = build_record(engine)
    assert method["fused_ops"] == {"EmbedLayerNormalization": 1, "Attention": 6, "BiasGelu": 6}
    ops = {n.op_type for n in onnx.load(str(engine.engine_path)).graph.node}
    assert {"Attention", "EmbedLayerNormalization"} <= ops


def test_fp16_autocast(engines: dict[str, EngineDir]) -> None:
    engine = engines["fp16"]
    report = compare_engine(engine, Tolerances.for_precision("fp16"))
    assert report.passed, report.table()
    for out in report.outputs.values():
        assert out.cosine_min >= 0.999
    method, counts = build_record(engine)
    assert method["method"] == "modelopt.autocast"
    assert method["calibration"] == "real text"
    # The float math runs in float16 (shape ops are int64); a few sensitive ops stay fp32.
    by_dtype = counts["by_output_dtype"]
    assert by_dtype["float16"] > 250
    assert by_dtype["float16"] > 5 * by_dtype["float32"]
    assert engine.manifest.outputs[0].dtype == "float32"


# Measured: min cosine 0.995 built-in / 0.992 held-out (docs/precision.md): the stretch goal
# (>= 0.99 on real text) with a little room for CPU kernel differences.
@pytest.mark.parametrize(
    ("texts", "floor"), [(None, 0.99), (HELDOUT, 0.99)], ids=["built-in", "held-out"]
)
def test_int8_passes_gate(engines: dict[str, EngineDir], texts: Path | None, floor: float) -> None:
    report = compare_engine(engines["int8"], Tolerances.for_precision("int8"), texts_file=texts)
    assert report.passed, report.table()
    for out in report.outputs.values():
        assert out.cosine_min >= floor
        assert out.cosine_mean >= 0.995


def test_int8_build_record(engines: dict[str, EngineDir]) -> None:
    method, counts = build_record(engines["int8"])
    assert method["method"] == "onnxruntime.quantize_dynamic"
    assert method["per_channel"] is True
    assert method["selection"] == "greedy"
    # 24 weighted nodes (6 fused attentions + 18 MatMuls); greedy keeps at most 9 in fp32,
    # stopping early once the calibration text's worst row reaches 0.996.
    kept = method["kept_fp32"]
    assert method["budget"] == 9
    assert 1 <= len(kept) <= 9
    assert method["calibration_sentences"] == 32
    assert method["calibration_cosine_min_all_int8"] < 0.99
    assert method["calibration_cosine_min"] >= 0.996 or len(kept) == 9
    assert method["calibration_cosine_min"] > method["calibration_cosine_min_all_int8"]
    steps = [step["keep_fp32"] for step in method["selection_steps"]]
    assert steps == kept
    # Layer 0's FFN down-projection costs most end to end (its local error is small).
    assert kept[0] == "/0/encoder/layer.0/output/dense/MatMul"
    assert all(n.endswith("dense/MatMul") or n.startswith("Attention") for n in kept), kept
    assert counts["by_op"]["QAttention"] + counts["by_op"]["MatMulInteger"] == 24 - len(kept)
    assert counts["by_op"]["DynamicQuantizeLinear"] >= 24 - len(kept)
    # The build log says which nodes stayed fp32 and what the calibration text reached.
    log = json.loads((engines["int8"].path / "build_log.json").read_text())
    assert log["precision"]["kept_fp32"] == kept
    assert log["precision"]["calibration_cosine_min"] == method["calibration_cosine_min"]
    assert 0 < log["precision"]["selection_s"] < log["timings"]["precision_s"]
