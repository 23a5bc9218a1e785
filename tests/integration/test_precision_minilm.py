"""fp32 / fp16 / int8 MiniLM engines (ONNX Runtime, CPU) against PyTorch, default tolerances."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.build.onnxruntime import ENGINE_FILE, fuse_transformer
from trtpipe.compare import Tolerances, compare_engine
from trtpipe.cpu_features import int8_kernel_family
from trtpipe.engine import EngineDir
from trtpipe.precision import int8_recipe, quantize_dynamic_int8

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


def test_outputs_advertise_real_shapes(engines: dict[str, EngineDir]) -> None:
    for engine in engines.values():
        shapes = {o.name: o.shape for o in engine.manifest.outputs}
        assert shapes == {"token_embeddings": [-1, -1, 384], "sentence_embedding": [-1, 384]}


# The floor is the product gate (mean >= 0.99, min >= 0.97), which holds on every CPU kind.
# ONNX Runtime's int8 kernels differ by CPU (trtpipe.cpu_features), so the measured figures,
# and the stretch goal (min >= 0.99), are reported per CPU kind in docs/precision.md, never
# asserted here.
@pytest.mark.parametrize("texts", [None, HELDOUT], ids=["built-in", "held-out"])
def test_int8_passes_gate(engines: dict[str, EngineDir], texts: Path | None) -> None:
    report = compare_engine(engines["int8"], Tolerances.for_precision("int8"), texts_file=texts)
    assert report.passed, report.table()
    for out in report.outputs.values():
        assert out.cosine_min >= 0.97 and out.cosine_mean >= 0.99
    # The report says which CPU int8 kernels it gated, the ones this machine has.
    assert report.cpu_int8_family == int8_kernel_family()
    assert report.to_dict()["cpu_int8_family"] == int8_kernel_family()
    assert f", {int8_kernel_family()} int8 kernels)" in report.table()


def test_int8_selection_beats_no_selection_on_held_out_text(
    engines: dict[str, EngineDir], minilm_onnx: Path, tmp_path: Path
) -> None:
    """The nodes greedy keeps in fp32 (chosen on the calibration text only) raise the worst
    held-out row over the same recipe with every node quantized (0.988 against 0.932 measured
    on an AVX2 CPU; the relation, not the figures, is what must hold everywhere)."""
    shipped = engines["int8"]
    recipe = shipped.manifest.build_options["precision"]
    everything = EngineDir(shutil.copytree(shipped.path, tmp_path / "all-int8"))
    fuse_transformer(minilm_onnx, tmp_path / "fused.onnx")
    quantize_dynamic_int8(
        tmp_path / "fused.onnx",
        everything.path / ENGINE_FILE,
        [],
        recipe["weight_type"],
        recipe["reduce_range"],
    )
    gate = Tolerances.for_precision("int8")
    selected = compare_engine(shipped, gate, texts_file=HELDOUT)
    unselected = compare_engine(everything, gate, texts_file=HELDOUT)
    for name in ("token_embeddings", "sentence_embedding"):
        assert selected.outputs[name].cosine_min > unselected.outputs[name].cosine_min, name
        assert selected.outputs[name].cosine_mean > unselected.outputs[name].cosine_mean, name


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
    assert method["calibration_cosine_min"] >= method["target_cosine"] or len(kept) == 9
    assert method["calibration_cosine_min"] > method["calibration_cosine_min_all_int8"]
    steps = [step["keep_fp32"] for step in method["selection_steps"]]
    assert steps == kept
    # Layer 0's FFN down-projection is among them on every CPU measured (its local error is
    # small; end to end it costs much), first on VNNI CPUs; the order depends on the kernels.
    assert "/0/encoder/layer.0/output/dense/MatMul" in kept
    # The recipe of this machine's int8 kernel family, recorded in the build record.
    recipe = int8_recipe()
    assert method["cpu_family"] == recipe["cpu_family"] == engines["int8"].manifest.cpu_int8_family
    assert method["weight_type"] == recipe["weight_type"]
    assert method["reduce_range"] is recipe["reduce_range"]
    assert method["target_cosine"] == recipe["target"]
    assert all(n.endswith("dense/MatMul") or n.startswith("Attention") for n in kept), kept
    assert counts["by_op"]["QAttention"] + counts["by_op"]["MatMulInteger"] == 24 - len(kept)
    assert counts["by_op"]["DynamicQuantizeLinear"] >= 24 - len(kept)
    # The build log says which nodes stayed fp32 and what the calibration text reached.
    log = json.loads((engines["int8"].path / "build_log.json").read_text())
    assert log["precision"]["kept_fp32"] == kept
    assert log["precision"]["calibration_cosine_min"] == method["calibration_cosine_min"]
    assert 0 < log["precision"]["selection_s"] < log["timings"]["precision_s"]
