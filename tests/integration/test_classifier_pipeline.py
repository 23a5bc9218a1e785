"""Classification heads through export -> build -> compare (tiny random models, real tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.compare import Tolerances, compare_engine
from trtpipe.export import export_model

from ..conftest import save_tiny_bert

SMALL = {"max_shapes": {"input_ids": [16, 64]}, "opt_shapes": {"input_ids": [8, 32]}}


@pytest.fixture(scope="module")
def classifier_onnx(tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(str(tiny_classifier_dir), tmp_path_factory.mktemp("cls-onnx") / "onnx")


@pytest.mark.parametrize(("precision", "top1"), [("fp32", 1.0), ("int8", 0.98)])
def test_text_classification(
    classifier_onnx: Path, tmp_path: Path, precision: str, top1: float
) -> None:
    engine = build_engine_dir(
        BuildConfig(
            onnx_path=classifier_onnx,
            output=tmp_path / precision,
            precision=precision,
            backend="onnxruntime",
            max_shapes=SMALL["max_shapes"],
            opt_shapes=SMALL["opt_shapes"],
        )
    )
    assert engine.manifest.task == "text-classification"
    assert engine.manifest.outputs[0].name == "logits"
    report = compare_engine(engine, Tolerances.for_precision(precision))
    assert report.passed, report.table()
    logits = report.outputs["logits"]
    assert logits.rows == 64
    assert logits.top1_agreement is not None and logits.top1_agreement >= top1
    if precision == "fp32":
        assert logits.max_abs <= 1e-4
    else:
        assert engine.manifest.build_options["precision"]["method"].endswith("quantize_dynamic")


@pytest.mark.parametrize("head", ["token", "qa"])
def test_token_head_fp32(tmp_path: Path, head: str) -> None:
    # A QA head has exactly two outputs (span start and end logits).
    model_dir = save_tiny_bert(tmp_path / "model", head=head, num_labels=2 if head == "qa" else 5)
    onnx_path = export_model(str(model_dir), tmp_path / "onnx")
    config = BuildConfig(onnx_path=onnx_path, output=tmp_path / "engine", backend="onnxruntime")
    config.max_shapes, config.opt_shapes = SMALL["max_shapes"], SMALL["opt_shapes"]
    engine = build_engine_dir(config)
    expected = {"token": "token-classification", "qa": "question-answering"}[head]
    assert engine.manifest.task == expected
    report = compare_engine(engine, Tolerances.for_precision("fp32"))
    assert report.passed, report.table()
    for out in report.outputs.values():
        assert out.max_abs <= 1e-4
        assert out.top1_agreement == 1.0
