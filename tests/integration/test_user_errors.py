"""Mistakes a user makes with every command and against a running server: one clear line (or a
4xx with a message), a non-zero exit, nothing half-written, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from trtpipe.cli.main import cli
from trtpipe.devices import Device, cuda_device_count, parse_gpus
from trtpipe.engine import EngineDir
from trtpipe.errors import BackendUnavailableError, InputError

TRTPIPE = [sys.executable, "-m", "trtpipe.cli.main"]
no_gpu = pytest.mark.skipif(cuda_device_count() > 0, reason="needs a machine without a GPU")


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def one_error_line(out: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    return errors[0]


def fake_decoder(engine: Path, target: Path) -> Path:
    """The tiny BERT engine with a KV-cache input in its manifest: what marks a decoder."""
    shutil.copytree(engine, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["inputs"].append(
        {"name": "past_key_values.0.key", "dtype": "float32", "shape": [-1, 2, -1, 8]}
    )
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


# -- output directories ----------------------------------------------------------------------------
def test_build_never_replaces_a_directory_it_did_not_write(tiny_bert_onnx: Path, tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, out = invoke("build", str(tiny_bert_onnx), "-o", str(precious))
    assert code == 2
    assert "already holds other files (no manifest.json)" in one_error_line(out)
    assert (precious / "notes.txt").read_text() == "keep me"
    # Building into the export dir itself would have deleted model.onnx.
    export_copy = tmp_path / "export"
    shutil.copytree(tiny_bert_onnx.parent, export_copy)
    code, out = invoke("build", str(export_copy / "model.onnx"), "-o", str(export_copy))
    assert code == 2 and (export_copy / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "precious"]


def test_export_never_replaces_a_directory_it_did_not_write(tiny_bert_dir: Path, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("keep me")
    code, out = invoke("export", str(tiny_bert_dir), "-o", str(tmp_path))
    assert code == 2 and "no model.onnx" in one_error_line(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_sigterm_during_build_leaves_nothing(tiny_bert_onnx: Path, tmp_path: Path):
    """``kill`` (or a CI timeout) right as the build starts (mid-import): the temp dir goes."""
    process = subprocess.Popen(
        [*TRTPIPE, "build", str(tiny_bert_onnx), "--fp16", "-o", str(tmp_path / "engine")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + 120
    while not any(tmp_path.iterdir()) and process.poll() is None:
        assert time.monotonic() < deadline, "build never started"
        time.sleep(0.01)
    assert [p.name.startswith(".engine.tmp-") for p in tmp_path.iterdir()] == [True]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert list(tmp_path.iterdir()) == []


# -- wrong kind of path ----------------------------------------------------------------------------
def test_build_given_a_directory(tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path: Path):
    code, out = invoke("build", str(tiny_bert_onnx.parent), "-o", str(tmp_path / "e"))
    assert code == 2
    assert f"did you mean {tiny_bert_onnx}?" in one_error_line(out)
    code, out = invoke("build", str(tiny_bert_engine), "-o", str(tmp_path / "e"))
    assert code == 2 and "an engine directory is built already" in one_error_line(out)
    assert list(tmp_path.iterdir()) == []


def test_engine_commands_given_an_export(tiny_bert_onnx: Path):
    for command, *extra in (
        ("inspect",),
        ("compare",),
        ("bench",),
        ("generate", "--prompt", "hi"),
        ("serve",),
    ):
        code, out = invoke(command, str(tiny_bert_onnx.parent), *extra)
        assert code == 2, command
        line = one_error_line(out)
        assert "is an exported model, not an engine directory" in line, line
        assert f"trtpipe build {tiny_bert_onnx} -o ENGINE_DIR" in line


def test_export_given_a_missing_path_or_an_engine(tiny_bert_engine: Path, tmp_path: Path):
    code, out = invoke("export", "./no/such/model", "-o", str(tmp_path / "x"))
    assert code == 2 and "model directory ./no/such/model does not exist" in one_error_line(out)
    code, out = invoke("export", str(tiny_bert_engine), "-o", str(tmp_path / "x"))
    assert code == 2 and "is an engine directory" in one_error_line(out)
    assert list(tmp_path.iterdir()) == []


def test_text_options_given_a_directory(tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path):
    code, out = invoke(
        "build", str(tiny_bert_onnx), "--int8", "--calib", str(tmp_path), "-o", str(tmp_path / "e")
    )
    assert code == 2 and f"{tmp_path} is a directory; give a text file" in one_error_line(out)
    code, out = invoke("compare", str(tiny_bert_engine), "--texts", str(tmp_path))
    assert code == 2 and "is a directory" in one_error_line(out)


def test_int8_on_onnx_without_tokenizer(tiny_bert_onnx: Path, tmp_path: Path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(tiny_bert_onnx, lone / "model.onnx")
    out_dir = str(tmp_path / "engine")
    # Without config.json it builds as a plain tensor model, whose int8 calibration needs the
    # tokenizer that input_ids imply: the missing tokenizer is named.
    code, out = invoke("build", str(lone / "model.onnx"), "--int8", "-o", out_dir)
    assert code == 2 and f"no tokenizer in {lone}" in one_error_line(out)
    code, out = invoke(
        "build", str(lone / "model.onnx"), "--int8", "--task", "feature-extraction", "-o", out_dir
    )
    assert code == 2
    assert f"no tokenizer in {lone}" in one_error_line(out)
    shutil.copyfile(tiny_bert_onnx.parent / "config.json", lone / "config.json")
    code, out = invoke("build", str(lone / "model.onnx"), "--int8", "-o", out_dir)
    assert code == 2 and f"no tokenizer in {lone}" in one_error_line(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone"]


# -- numbers ---------------------------------------------------------------------------------------
def test_zero_and_negative_numbers(tiny_bert_onnx: Path, tiny_bert_engine: Path, tmp_path: Path):
    out_dir = str(tmp_path / "engine")
    code, out = invoke("build", str(tiny_bert_onnx), "--workspace-mb", "-5", "-o", out_dir)
    assert code == 2 and "-5 is not in the range x>=1" in out
    code, out = invoke(
        "build", str(tiny_bert_onnx), "--max-shapes", "input_ids:0x64", "-o", out_dir
    )
    assert code == 2 and "batch maximum must be >= 1, got 0" in one_error_line(out)
    for option, value in (("--random", "-2"), ("--batch-size", "0"), ("--seq-len", "0")):
        code, out = invoke("compare", str(tiny_bert_engine), option, value)
        assert code == 2 and f"Invalid value for '{option}'" in out, option
    code, out = invoke("compare", str(tiny_bert_engine), "--min-top1", "5")
    assert code == 2 and "5.0 is not in the range 0<=x<=1" in out
    assert list(tmp_path.iterdir()) == []


def test_json_path_is_checked_before_the_run(tiny_bert_engine: Path, tmp_path: Path):
    code, out = invoke("compare", str(tiny_bert_engine), "--random", "2", "--json", str(tmp_path))
    assert code == 2 and f"--json {tmp_path} is a directory" in one_error_line(out)
    assert "PASSED" not in out  # refused before any work
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out = invoke(
        "compare", str(tiny_bert_engine), "--random", "2", "--json", str(blocker / "r.json")
    )
    assert code == 2 and f"{blocker} is a file, not a directory" in one_error_line(out)
    report = tmp_path / "reports" / "r.json"
    code, out = invoke("compare", str(tiny_bert_engine), "--random", "2", "--json", str(report))
    assert code == 0 and json.loads(report.read_text())["passed"] is True
    assert sorted(p.name for p in report.parent.iterdir()) == ["r.json"]


# -- wrong kind of engine --------------------------------------------------------------------------
def test_compare_and_bench_on_a_decoder_engine(tiny_bert_engine: Path, tmp_path: Path):
    decoder = fake_decoder(tiny_bert_engine, tmp_path / "decoder")
    code, out = invoke("compare", str(decoder))
    assert code == 2 and "is a text-generation (KV-cache) engine" in one_error_line(out)
    code, out = invoke("bench", str(decoder), "--baseline", "none")
    assert code == 2 and "benchmark it with --generate" in one_error_line(out)


# -- devices ---------------------------------------------------------------------------------------
@no_gpu
def test_gpus_on_a_machine_without_gpus(tiny_bert_engine: Path, tmp_path: Path):
    from trtpipe.cuda import unusable_reason

    # The cause is named (here: the installed cuda-python and the missing driver), not only
    # "no GPU".
    reason = unusable_reason()
    assert reason
    expected = f"cuda:0 requested but no CUDA GPU is usable here: {reason}"
    code, out = invoke("compare", str(tiny_bert_engine), "--device", "cuda:0")
    assert code == 2 and expected in one_error_line(out)
    code, out = invoke("bench", str(tiny_bert_engine), "--baseline", "none", "--gpus", "0,1")
    assert code == 2 and expected in one_error_line(out)
    code, out = invoke("build", "x.onnx", "--device", "cuda:0", "-o", str(tmp_path / "e"))
    assert code == 2 and expected in one_error_line(out)
    # The pool reports the same mistake on every device once, not as a device failure.
    from trtpipe.runtime.pool import DevicePool

    pool = DevicePool.for_engine(tiny_bert_engine, parse_gpus("0,1"))
    with pytest.raises(BackendUnavailableError, match=re.escape(expected)):
        pool.start()
    pool.close()


# -- the server ------------------------------------------------------------------------------------
def test_token_ids_outside_the_vocabulary(tiny_bert_engine: Path):
    """An id past the embedding table used to crash the kernel, mark the device unhealthy and
    take the model down for everyone (503). Now: a 400 naming the range, still serving."""
    from tests.server_utils import start_server

    thread = start_server([f"bert={tiny_bert_engine}"], devices=1, grpc=False)
    url = f"http://127.0.0.1:{thread.server.http_port}"

    def request(ids: list[int], types: list[int]) -> httpx.Response:
        inputs = [
            {"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": ids},
            {"name": "attention_mask", "datatype": "INT64", "shape": [1, 2], "data": [1, 1]},
            {"name": "token_type_ids", "datatype": "INT64", "shape": [1, 2], "data": types},
        ]
        return httpx.post(f"{url}/v2/models/bert/infer", json={"inputs": inputs}, timeout=30)

    try:
        for ids, types, name, high in (
            ([101, 999_999_999], [0, 0], "input_ids", 30521),
            ([101, -5], [0, 0], "input_ids", 30521),
            ([101, 102], [0, 7], "token_type_ids", 1),
        ):
            reply = request(ids, types)
            assert reply.status_code == 400
            assert reply.json()["error"] == (
                f"input {name!r} holds values outside 0..{high} "
                f"(model 'bert' has {high + 1} entries)"
            )
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        ok = request([101, 102], [0, 0])
        assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [1, 2, 32]
    finally:
        thread.stop()


def test_runner_treats_invalid_data_as_the_callers_error(tiny_bert_engine: Path):
    from trtpipe.runners.onnxruntime import OnnxRuntimeRunner

    ids = np.array([[101, 999_999_999]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
    with OnnxRuntimeRunner(EngineDir(tiny_bert_engine), Device("cpu")) as runner:
        with pytest.raises(InputError, match="onnxruntime@cpu:0 rejected the inputs"):
            runner.infer(feeds)
        feeds["input_ids"] = np.array([[101, 102]], np.int64)
        assert runner.infer(feeds)["last_hidden_state"].shape == (1, 2, 32)


def test_port_in_use_is_reported_before_loading(tiny_bert_engine: Path):
    from trtpipe.server.app import InferenceServer, ServerConfig
    from trtpipe.server.config import ServeConfig
    from trtpipe.server.repository import ModelRepository

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for http_port, grpc_port, what in ((port, None, "HTTP"), (0, port, "gRPC")):
            repository = ModelRepository.from_specs([str(tiny_bert_engine)], ServeConfig())
            server = InferenceServer(
                repository, ServerConfig(http_port=http_port, grpc_port=grpc_port)
            )
            with pytest.raises(InputError, match=f"cannot listen for {what} on 127.0.0.1:{port}"):
                asyncio.run(server.start())
            model = next(iter(repository))
            assert model.batcher is None and not model.pool.ready  # nothing was loaded


def test_generation_models_are_named_where_tensor_models_are_asked_for():
    from types import SimpleNamespace

    from trtpipe.server.errors import ModelNotFoundError
    from trtpipe.server.repository import ModelRepository

    # A stand-in for a ServedGeneration: the repository reads only where its engine lives.
    llm = SimpleNamespace(generator=SimpleNamespace(engine=SimpleNamespace(path="/engines/llm")))
    repository = ModelRepository([], {"llm": llm})
    assert repository.names == ["llm"]
    with pytest.raises(ModelNotFoundError, match=r"'llm' is a text-generation engine: use POST "):
        repository.get("llm")
    with pytest.raises(
        ModelNotFoundError, match=r"unknown model: 'x' is not found; this server serves \['llm'\]"
    ):
        repository.get("x")


def test_generation_requests_with_wrong_types_get_400():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from trtpipe.server.generate_routes import generate_router

    class Unused:
        def generate(self, *args: object) -> None:
            raise AssertionError("a bad request must not reach the generator")

    app = FastAPI()
    app.include_router(generate_router({"llm": Unused()}))  # type: ignore[dict-item]
    client = TestClient(app)
    cases = [
        ("/v1/completions", {"model": "llm", "prompt": 5}, "must be a string or a list"),
        ("/v1/completions", {"model": "llm", "prompt": "hi", "max_tokens": 2.5}, "integer"),
        ("/v1/completions", {"model": "llm", "prompt": "hi", "seed": "x"}, "'seed' must be"),
        ("/v1/completions", {"model": "llm", "prompt": "hi", "n": "x"}, '"n": 1'),
        ("/v2/models/llm/generate", {"text_input": "hi", "parameters": [1]}, "JSON object"),
        ("/v2/models/llm/generate", {"text_input": "hi", "max_tokens": True}, "integer"),
    ]
    for path, body, message in cases:
        reply = client.post(path, json=body)
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert message in (error["message"] if isinstance(error, dict) else error), body
