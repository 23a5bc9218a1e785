"""Bad input through the CLI: one clear line, non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trtpipe.cli.main import cli
from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import EngineMismatchError, InputError
from trtpipe.runners.onnxruntime import OnnxRuntimeRunner


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_missing_onnx(tmp_path: Path):
    code, out = invoke("build", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "e"))
    assert code == 2
    assert "does not exist" in out and "Traceback" not in out
    assert leftovers(tmp_path) == []


def test_corrupt_onnx_leaves_nothing(tmp_path: Path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff")
    code, out = invoke("build", str(bad), "-o", str(tmp_path / "engine"))
    assert code == 2
    assert "not a valid ONNX file" in out
    assert leftovers(tmp_path) == ["model.onnx"]


def test_unknown_task(tmp_path: Path):
    code, out = invoke("export", "-o", str(tmp_path / "x"), "--task", "summarize-my-email")
    assert code == 2
    assert "'summarize-my-email' is not one of" in out
    assert leftovers(tmp_path) == []


def test_unknown_hub_model_offline(tmp_path: Path):
    code, out = invoke("export", "nobody/no-such-model", "-o", str(tmp_path / "x"))
    assert code == 2
    assert out.count("error:") == 1 and "cannot export 'nobody/no-such-model'" in out
    assert leftovers(tmp_path) == []


def test_int8_without_usable_calibration(tiny_bert_onnx: Path, tmp_path: Path):
    empty = tmp_path / "calib.txt"
    empty.write_text("\n   \n")
    out_dir = tmp_path / "engine"
    code, out = invoke(
        "build", str(tiny_bert_onnx), "--int8", "--calib", str(empty), "-o", str(out_dir)
    )
    assert code == 2 and "holds no text" in out
    code, out = invoke(
        "build",
        str(tiny_bert_onnx),
        "--int8",
        "--calib",
        str(tmp_path / "nope.txt"),
        "-o",
        str(out_dir),
    )
    assert code == 2 and "does not exist" in out
    assert leftovers(tmp_path) == ["calib.txt"]


def test_shapes_outside_model_limits(tiny_bert_onnx: Path, tmp_path: Path):
    out_dir = tmp_path / "engine"
    code, out = invoke(
        "build", str(tiny_bert_onnx), "--max-shapes", "input_ids:8x4096", "-o", str(out_dir)
    )
    assert code == 2 and "exceeds the model's 128 positions" in out
    code, out = invoke(
        "build", str(tiny_bert_onnx), "--opt-shapes", "input_ids:8x", "-o", str(out_dir)
    )
    assert code == 2 and "bad shape" in out
    assert not out_dir.exists()


def test_runner_rejects_inputs_outside_profile(tiny_bert_engine: Path):
    engine = EngineDir(tiny_bert_engine)
    with OnnxRuntimeRunner(engine, Device("cpu")) as runner:
        ok = {
            "input_ids": np.ones((2, 8), np.int64),
            "attention_mask": np.ones((2, 8), np.int64),
            "token_type_ids": np.zeros((2, 8), np.int64),
        }
        assert runner.infer(ok)["last_hidden_state"].shape == (2, 8, 32)
        too_long = {k: np.ones((1, 65), np.int64) for k in ok}
        with pytest.raises(
            InputError, match=r"outside the engine's profile \(min \[1, 1\], max \[8, 64\]\)"
        ):
            runner.infer(too_long)
        with pytest.raises(InputError, match="dtype float32, expected int64"):
            runner.infer({**ok, "input_ids": ok["input_ids"].astype(np.float32)})
        with pytest.raises(InputError, match="unknown input"):
            runner.infer({**ok, "pixels": ok["input_ids"]})


def test_engine_dir_for_another_backend(tiny_bert_engine: Path, tmp_path: Path):
    copy = tmp_path / "engine"
    shutil.copytree(tiny_bert_engine, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backend"] = "tensorrt"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatchError, match="built for tensorrt, not onnxruntime"):
        OnnxRuntimeRunner(EngineDir(copy), Device("cpu"))
    manifest["backend"] = "openvino"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, out = invoke("inspect", str(copy))
    assert code == 2 and "unknown backend 'openvino'" in out


def test_broken_engine_dirs(tiny_bert_engine: Path, tmp_path: Path):
    copy = tmp_path / "engine"
    shutil.copytree(tiny_bert_engine, copy)
    (copy / "manifest.json").write_text("{ not json")
    code, out = invoke("compare", str(copy))
    assert code == 2 and "is not valid JSON" in out
    code, out = invoke("inspect", str(tmp_path / "missing"))
    assert code == 2 and "is not an engine directory" in out


def error_line(out: str) -> str:
    """The one ``error:`` line (and no traceback) a user mistake gets."""
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    return errors[0]


def test_two_precisions_name_both_flags(tiny_bert_onnx: Path, tmp_path: Path):
    out_dir = str(tmp_path / "engine")
    code, out = invoke("build", str(tiny_bert_onnx), "--fp16", "--int8", "-o", out_dir)
    assert code == 2
    assert error_line(out) == (
        "error: --fp16 and --int8 both given: choose one precision per engine dir"
    )
    code, out = invoke("build", str(tiny_bert_onnx), "--int8", "--fp32", "--fp16", "-o", out_dir)
    assert code == 2 and "--fp16 and --int8 and --fp32 both given" in error_line(out)
    assert leftovers(tmp_path) == []


def test_options_of_another_precision_or_backend(tiny_bert_onnx: Path, tmp_path: Path):
    calib = tmp_path / "calib.txt"
    calib.write_text("A sentence.\n")
    out_dir = str(tmp_path / "engine")
    code, out = invoke("build", str(tiny_bert_onnx), "--calib", str(calib), "-o", out_dir)
    assert code == 2
    assert error_line(out) == (
        "error: --calib is for --fp16 or --int8 builds; fp32 needs no calibration"
    )
    code, out = invoke(
        "build", str(tiny_bert_onnx), "--fp16", "--int8-target", "0.99", "-o", out_dir
    )
    assert code == 2
    assert error_line(out) == "error: --int8-target applies to --int8 builds only (this is fp16)"
    code, out = invoke("build", str(tiny_bert_onnx), "--int8-select", "proxy", "-o", out_dir)
    assert code == 2 and "--int8-select applies to --int8 builds only" in error_line(out)
    code, out = invoke(
        "build", str(tiny_bert_onnx), "--backend", "onnxruntime", "--opt-level", "5",
        "--timing-cache", str(tmp_path / "cache.bin"), "-o", out_dir,
    )  # fmt: skip
    assert code == 2
    assert error_line(out) == (
        "error: --opt-level, --timing-cache: TensorRT options, but --backend is onnxruntime"
    )
    assert leftovers(tmp_path) == ["calib.txt"]


def test_output_that_cannot_be_written(tiny_bert_onnx: Path, tiny_bert_dir: Path, tmp_path: Path):
    """Used to be a FileNotFoundError traceback from deep in the build, after the work."""
    for command, source in (("build", tiny_bert_onnx), ("export", tiny_bert_dir)):
        code, out = invoke(command, str(source), "-o", "/proc/trtpipe-engine")
        assert code == 2, command
        assert error_line(out).startswith("error: -o /proc/trtpipe-engine: cannot write in /proc (")
        assert "building" not in out and "exporting" not in out  # refused before any work
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out = invoke("build", str(tiny_bert_onnx), "-o", str(blocker / "engine"))
    assert code == 2 and f"{blocker} is a file, not a directory" in error_line(out)
    code, out = invoke("build", str(tiny_bert_onnx), "-o", str(blocker))
    assert code == 2 and "exists and is not a directory" in error_line(out)
    assert leftovers(tmp_path) == ["file"]
    assert not [p for p in Path("/proc").glob(".trtpipe-engine*")]


def test_conflicting_max_shapes_name_both_inputs(tiny_bert_onnx: Path, tmp_path: Path):
    out_dir = str(tmp_path / "engine")
    code, out = invoke(
        "build", str(tiny_bert_onnx), "--max-shapes", "input_ids:8x64,attention_mask:4x64",
        "-o", out_dir,
    )  # fmt: skip
    assert code == 2
    assert error_line(out) == (
        "error: --max-shapes gives input_ids batch 8 but attention_mask batch 4; "
        "inputs sharing the batch dim must agree"
    )
    code, out = invoke(
        "build", str(tiny_bert_onnx), "--opt-shapes", "input_ids:4x16,input_ids:4x32", "-o", out_dir
    )
    assert code == 2 and "input_ids given twice" in error_line(out)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "4"], "--concurrency applies to the online mode (--url), not to the "
         "offline mode (ENGINE_DIR)"),
        (["--max-new-tokens", "8"], "--max-new-tokens applies to the generation mode"),
        (["--generate", "--texts", "x.txt"], "--texts applies to the offline mode (ENGINE_DIR) "
         "or the online mode (--url), not to the generation mode (--generate)"),
        (["--url", "127.0.0.1:9", "--model", "m"], "give the served engine as --engine-dir"),
        (["--url", "127.0.0.1:9", "--generate"], "give the served engine as --engine-dir"),
        (["--text-limit", "0"], "Invalid value for '--text-limit'"),
        (["--scaling-batches", "0"], "Invalid value for '--scaling-batches'"),
    ],
)  # fmt: skip
def test_bench_options_of_another_mode(
    tiny_bert_engine: Path, tmp_path: Path, args: list[str], message: str
):
    report = tmp_path / "r.json"
    code, out = invoke("bench", str(tiny_bert_engine), *args, "--json", str(report))
    assert code == 2 and message in out, out
    assert "Traceback" not in out and "speedup" not in out  # refused before any work
    assert leftovers(tmp_path) == []


def test_default_output_is_quiet(tiny_bert_dir: Path, tmp_path: Path):
    """Without -v: trtpipe's own lines only. No TracerWarnings or deprecations from the export,
    no ModelOpt lines (they came twice: its own handler and the root one), no ONNX Runtime
    fusion warnings; the one ``wrote`` line per command still goes to stdout."""
    import os
    import subprocess
    import sys

    def trtpipe(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trtpipe.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )

    export = trtpipe("export", str(tiny_bert_dir), "-o", str(tmp_path / "onnx"))
    build = trtpipe(
        "build", str(tmp_path / "onnx" / "model.onnx"), "--fp16", "-o", str(tmp_path / "e")
    )
    for proc, first in ((export, "exporting "), (build, "building fp16 engine for ")):
        assert proc.returncode == 0, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[0].startswith(first), proc.stderr
        others = [line for line in lines[1:] if not line.startswith("INFO trtpipe.")]
        assert others == [], proc.stderr
        assert proc.stdout.startswith("wrote ") and proc.stdout.count("\n") == 1, proc.stdout


def test_report_files_that_cannot_be_written(tiny_bert_engine: Path, tmp_path: Path):
    """--json / --plot where no file can go: said before the run, not as a traceback after it."""
    cases = [
        ("compare", "--random", "2", "--json", "/proc/r.json"),
        ("bench", "--baseline", "none", "--runs", "1", "--json", "/proc/b.json"),
        ("bench", "--baseline", "none", "--runs", "1", "--plot", "/proc/b.png"),
    ]
    for command, *options in cases:
        code, out = invoke(command, str(tiny_bert_engine), *options)
        option, path = options[-2:]
        assert code == 2, out
        assert error_line(out).startswith(f"error: {option} {path}: cannot write in /proc (")
        assert "PASSED" not in out and "speedup" not in out  # refused before any work
    code, out = invoke("bench", str(tiny_bert_engine), "--plot", str(tmp_path))
    assert code == 2 and f"--plot {tmp_path} is a directory; give a file name" in error_line(out)
    assert leftovers(tmp_path) == []


def test_timing_cache_that_cannot_be_written(tiny_bert_onnx: Path, tmp_path: Path):
    """TensorRT updates --timing-cache after the build: an unwritable place is said first."""
    from tests.fakes.install import installed_fakes

    with installed_fakes():
        code, out = invoke(
            "build", str(tiny_bert_onnx), "--backend", "tensorrt",
            "--timing-cache", "/proc/trt.cache", "-o", str(tmp_path / "engine"),
        )  # fmt: skip
    assert code == 2
    assert error_line(out).startswith(
        "error: --timing-cache /proc/trt.cache: cannot write in /proc ("
    )
    assert "building" not in out and leftovers(tmp_path) == []


def test_container_entry_serves_every_engine_dir(tmp_path: Path):
    """scripts/docker_serve.sh (the images' entry point): every DIR/manifest.json under
    $TRTPIPE_MODELS, image defaults from $TRTPIPE_SERVE_ARGS, then the caller's options; a clear
    error when nothing is mounted. ``trtpipe`` is a stub here that prints its arguments."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[2] / "scripts" / "docker_serve.sh"
    stub = tmp_path / "bin" / "trtpipe"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    stub.chmod(0o755)
    models = tmp_path / "models"
    for name in ("a", "b c", "not-an-engine"):
        (models / name).mkdir(parents=True)
    for name in ("a", "b c"):
        (models / name / "manifest.json").write_text("{}")
    env = {
        **os.environ,
        "PATH": f"{stub.parent}:{os.environ['PATH']}",
        "TRTPIPE_MODELS": str(models),
        "TRTPIPE_SERVE_ARGS": "--gpus 0",
    }
    run = subprocess.run(
        ["sh", str(script), "--gpus", "0,1"], capture_output=True, text=True, env=env, timeout=30
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "serve", "--host", "0.0.0.0", "--gpus", "0", "--gpus", "0,1",
        str(models / "a"), str(models / "b c"),
    ]  # fmt: skip
    empty = subprocess.run(
        ["sh", str(script)],
        capture_output=True,
        text=True,
        env={**env, "TRTPIPE_MODELS": str(tmp_path / "none")},
        timeout=30,
    )
    assert empty.returncode == 2 and empty.stdout == ""
    assert empty.stderr.startswith(f"error: no engine dirs (DIR/manifest.json) under {tmp_path}")


def test_log_filter_shows_trtpipe_and_turned_on_loggers_only():
    """What reaches stderr without -v: trtpipe's records, ERRORs of others, and the loggers a
    command turns on (serve --access-log shows uvicorn.access)."""
    import logging

    from trtpipe.cli import logs

    quiet = logs._ByOrigin(logs.third_party_level(0))

    def shown(name: str, level: int) -> bool:
        return quiet.filter(logging.LogRecord(name, level, __file__, 1, "m", None, None))

    assert shown("trtpipe.build", logging.INFO) and shown("trtpipe", logging.INFO)
    assert not shown("modelopt.onnx.autocast", logging.INFO)
    assert not shown("fusion_skiplayernorm", logging.WARNING) and not shown("root", logging.WARNING)
    assert shown("onnxruntime", logging.ERROR)
    assert not shown("trtpipe_other", logging.INFO)  # a prefix, not a package
    assert not shown("uvicorn.access", logging.INFO)
    logs.show_logger("uvicorn.access")
    try:
        assert shown("uvicorn.access", logging.INFO) and not shown("uvicorn.error", logging.INFO)
        assert logging.getLogger("uvicorn.access").level == logging.INFO
    finally:
        logs._shown.discard("uvicorn.access")
        logging.getLogger("uvicorn.access").setLevel(logging.NOTSET)
    verbose = logs._ByOrigin(logs.third_party_level(1))
    assert verbose.filter(
        logging.LogRecord("modelopt", logging.WARNING, __file__, 1, "m", None, None)
    )
