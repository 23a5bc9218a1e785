"""int8 pipeline stages on CPU: all-MiniLM-L6-v2 in 2 stages, each quantized as the unsplit int8
engine is (ONNX Runtime dynamic int8, greedy fp32 selection), against PyTorch.

Stage 0 calibrates on the tokenized calibration text; stage 1 on the fp32 hidden state stage 0's
blocks produce from that text (not on int8 stage 0's output, and not on random data). The gate
is the product int8 gate, the one the unsplit int8 engine passes on this CPU: ONNX Runtime's
int8 kernels differ by CPU kind (docs/precision.md), so no stricter floor is asserted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from trtpipe.cli.main import cli
from trtpipe.compare import Tolerances, compare_engine
from trtpipe.cpu_features import int8_kernel_family
from trtpipe.devices import Device
from trtpipe.engine import EngineDir

HELDOUT = Path(__file__).parent.parent / "data" / "heldout_sentences.txt"
CPU = [Device("cpu", 0), Device("cpu", 1)]


@pytest.fixture(scope="module")
def int8_stages(
    minilm_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[EngineDir, list[Any]]:
    """The engine and the BuildConfig each stage was built from (to check its calibration)."""
    import trtpipe.build

    out = tmp_path_factory.mktemp("pp2-int8") / "minilm-pp2-int8"
    configs: list[Any] = []
    real_build = trtpipe.build.build_engine_dir

    def recording(config: Any) -> Any:
        if not config.pipeline_stages:
            configs.append(config)
        return real_build(config)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trtpipe.build, "build_engine_dir", recording)
        result = CliRunner().invoke(
            cli,
            ["build", str(minilm_onnx), "--backend", "onnxruntime", "--int8",
             "--pipeline-stages", "2", "--max-shapes", "input_ids:32x256", "-o", str(out)],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    return EngineDir(out), configs


def test_int8_stages_pass_the_int8_gate(int8_stages: tuple[EngineDir, list[Any]]):
    engine, _ = int8_stages
    assert engine.manifest.precision == "int8"
    assert engine.manifest.cpu_int8_family == int8_kernel_family()
    for texts in (None, HELDOUT):
        report = compare_engine(
            engine, Tolerances.for_precision("int8"), device=CPU, texts_file=texts
        )
        assert report.passed, report.table()
        for out in report.outputs.values():
            assert out.cosine_min >= 0.97 and out.cosine_mean >= 0.99
        assert report.cpu_int8_family == int8_kernel_family()


def test_each_stage_is_quantized_and_calibrated_on_fp32_boundaries(
    int8_stages: tuple[EngineDir, list[Any]], minilm_onnx: Path
):
    import onnx
    import onnxruntime as ort

    engine, configs = int8_stages
    assert [s["layers"] for s in engine.manifest.stages] == [[0, 0], [1, 5]]
    for stage in engine.stage_dirs():
        assert stage.manifest.precision == "int8"
        method = stage.manifest.build_options["precision"]
        assert method["method"] == "onnxruntime.quantize_dynamic"
        assert method["selection"] == "greedy"
        log = json.loads((stage.path / "build_log.json").read_text())
        assert log["op_counts"]["integer_ops"] > 0  # its MatMuls really run in int8
    first, second = (c.calibration_feeds for c in configs)
    boundary = engine.manifest.stages[0]["outputs"]
    assert set(first) == set(engine.manifest.stages[0]["inputs"]) >= {"input_ids"}
    assert set(second) == set(engine.manifest.stages[1]["inputs"]) and set(boundary) <= set(second)
    np.testing.assert_array_equal(second["attention_mask"], first["attention_mask"])
    # Stage 1's calibration hidden state is the fp32 graph's own tensor on the same text.
    model = onnx.load(str(minilm_onnx))
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in boundary)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(boundary, first)
    for name, value in zip(boundary, want, strict=True):
        assert second[name].dtype == np.float32 and second[name].shape == value.shape
        np.testing.assert_allclose(second[name], value, atol=1e-5, rtol=0)
