"""An int8 ONNX Runtime engine records its CPU int8 kernel family; loading it on another family
warns once per engine; inspect shows it; engine dirs without the field still load."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from trtpipe import cpu_features
from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.devices import Device
from trtpipe.engine import MANIFEST_NAME, EngineDir
from trtpipe.inspect import summarize
from trtpipe.runners import onnxruntime as ort_runner
from trtpipe.runners.onnxruntime import OnnxRuntimeRunner

RUNNER_LOG = "trtpipe.runners.onnxruntime"


@pytest.fixture(scope="module")
def int8_engine(tiny_bert_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-int8") / "engine"
    build_engine_dir(
        BuildConfig(
            onnx_path=tiny_bert_onnx,
            output=out,
            precision="int8",
            backend="onnxruntime",
            max_shapes={"input_ids": [8, 64]},
        )
    )
    return out


@pytest.fixture()
def engine_copy(int8_engine: Path, tmp_path: Path) -> Path:
    """A private copy (the warning is deduplicated per engine path)."""
    return Path(shutil.copytree(int8_engine, tmp_path / "engine"))


def load_twice(path: Path) -> None:
    for _ in range(2):
        runner = OnnxRuntimeRunner(EngineDir(path), Device("cpu"), threads=1)
        runner.load()
        runner.close()


def family_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == RUNNER_LOG and r.levelno == logging.WARNING and "int8 kernels" in r.message
    ]


def test_manifest_records_this_machines_family(int8_engine: Path) -> None:
    engine = EngineDir(int8_engine)
    here = cpu_features.int8_kernel_family()
    assert engine.manifest.cpu_int8_family == here
    recorded = json.loads((int8_engine / MANIFEST_NAME).read_text())
    assert recorded["cpu_int8_family"] == here
    precision = engine.manifest.build_options["precision"]
    assert precision["cpu_family"] == here
    build_log = json.loads((int8_engine / "build_log.json").read_text())
    assert build_log["precision"]["cpu_family"] == here
    assert f"int8 kernels {here} (built on this kind of CPU)" in summarize(engine)


def test_other_family_warns_once_per_engine(
    engine_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    built_on = EngineDir(engine_copy).manifest.cpu_int8_family
    other = "avx512vnni" if built_on != "avx512vnni" else "avx2"
    monkeypatch.setattr(cpu_features, "int8_kernel_family", lambda: other)
    with caplog.at_level(logging.WARNING, logger=RUNNER_LOG):
        load_twice(engine_copy)
    warnings = family_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"{built_on} int8 kernels" in warnings[0]
    assert f"this CPU uses {other} kernels" in warnings[0]
    assert f"trtpipe compare {engine_copy}" in warnings[0]
    text = summarize(EngineDir(engine_copy))
    assert f"int8 kernels {built_on}; this CPU: {other}, accuracy unchecked here" in text


def test_same_family_does_not_warn(
    engine_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    built_on = EngineDir(engine_copy).manifest.cpu_int8_family
    monkeypatch.setattr(cpu_features, "int8_kernel_family", lambda: built_on)
    with caplog.at_level(logging.WARNING, logger=RUNNER_LOG):
        load_twice(engine_copy)
    assert family_warnings(caplog) == []
    assert not ort_runner.warn_if_other_int8_family(EngineDir(engine_copy))


def test_engine_dir_without_the_field_loads_without_warning(
    engine_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An int8 engine dir written before the field existed (trtpipe 0.1.0)."""
    manifest_path = engine_copy / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    del data["cpu_int8_family"]
    manifest_path.write_text(json.dumps(data))
    monkeypatch.setattr(cpu_features, "int8_kernel_family", lambda: "amx")
    engine = EngineDir(engine_copy)
    assert engine.manifest.cpu_int8_family == ""
    with caplog.at_level(logging.WARNING, logger=RUNNER_LOG):
        load_twice(engine_copy)
    assert family_warnings(caplog) == []
    assert "int8 kernels not recorded (built before trtpipe recorded it); this CPU: amx" in (
        summarize(engine)
    )


def test_fp32_engine_has_no_family(tiny_bert_engine: Path) -> None:
    engine = EngineDir(tiny_bert_engine)
    assert engine.manifest.cpu_int8_family == ""
    assert "int8 kernels" not in summarize(engine)
