"""The real server on loopback, driven by tritonclient (HTTP and gRPC, JSON and binary).

Outputs are compared with the engine's runner called directly: bit-exact when a request runs
alone (same backend, no padding), close when the batcher padded it with other requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.server_utils import fetch as fetch_port
from tests.server_utils import random_feeds, start_server, text_feeds
from trtpipe.server.app import ServerThread

MODEL = "tiny"
NAMES = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="module")
def server(tiny_bert_engine: Path) -> Iterator[ServerThread]:
    thread = start_server([f"{MODEL}={tiny_bert_engine}"], devices=2, max_body_bytes=1 << 20)
    yield thread
    thread.stop()


@pytest.fixture
def runner(tiny_bert_reference: Any) -> Any:
    return tiny_bert_reference


@pytest.fixture
def http(server: ServerThread) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")


@pytest.fixture
def grpc(server: ServerThread) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"127.0.0.1:{server.server.grpc_port}")


def fetch(
    server: ServerThread,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    port = server.server.http_port
    assert port is not None
    return fetch_port(port, path, body, headers)


def http_inputs(feeds: dict[str, np.ndarray], binary: bool) -> list[httpclient.InferInput]:
    inputs = []
    for name in NAMES:
        item = httpclient.InferInput(name, list(feeds[name].shape), "INT64")
        item.set_data_from_numpy(feeds[name], binary_data=binary)
        inputs.append(item)
    return inputs


def grpc_inputs(feeds: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name in NAMES:
        item = grpcclient.InferInput(name, list(feeds[name].shape), "INT64")
        item.set_data_from_numpy(feeds[name])
        inputs.append(item)
    return inputs


# -- metadata ---------------------------------------------------------------------------------
def test_health_metadata_and_config(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(MODEL)
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready(MODEL)
    meta = http.get_server_metadata()
    assert meta["name"] == "trtpipe"
    assert {"binary_tensor_data", "statistics", "model_configuration"} <= set(meta["extensions"])
    model = http.get_model_metadata(MODEL)
    assert model["inputs"][0] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
    assert model["outputs"] == [
        {"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, 32]}
    ]
    assert model["parameters"]["max_sequence_length"] == 64
    config = http.get_model_config(MODEL)
    assert config["max_batch_size"] == 8 and config["backend"] == "onnxruntime"
    assert config["input"][0] == {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]}
    assert config["output"][0]["dims"] == [-1, 32]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["instance_group"] == [{"name": f"{MODEL}_cpu", "kind": "KIND_CPU", "count": 2}]
    grpc_config = grpc.get_model_config(MODEL, as_json=True)["config"]
    assert grpc_config["max_batch_size"] == 8
    assert grpc_config["input"][1]["data_type"] == "TYPE_INT64"
    assert grpc.get_model_metadata(MODEL, as_json=True)["outputs"][0]["shape"] == ["-1", "-1", "32"]


# -- inference ------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_infer_is_bit_exact(
    http: httpclient.InferenceServerClient, runner: Any, binary: bool
) -> None:
    feeds = random_feeds(np.random.default_rng(1), batch=3, length=11)
    outputs = [httpclient.InferRequestedOutput("last_hidden_state", binary_data=binary)]
    result = http.infer(MODEL, http_inputs(feeds, binary), outputs=outputs, request_id="r7")
    got = result.as_numpy("last_hidden_state")
    want = runner.infer(feeds)["last_hidden_state"]
    assert got.shape == (3, 11, 32)
    assert np.array_equal(got, want)
    assert result.get_response()["id"] == "r7"


def test_grpc_infer_raw_and_typed_contents_are_bit_exact(
    grpc: grpcclient.InferenceServerClient, server: ServerThread, runner: Any
) -> None:
    feeds = random_feeds(np.random.default_rng(2), batch=2, length=9)
    want = runner.infer(feeds)["last_hidden_state"]
    result = grpc.infer(MODEL, grpc_inputs(feeds))
    assert np.array_equal(result.as_numpy("last_hidden_state"), want)

    # typed contents (int64_contents) instead of raw_input_contents, straight on the stub
    import grpc as grpclib
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=MODEL)
    for name in NAMES:
        tensor = request.inputs.add(name=name, datatype="INT64", shape=list(feeds[name].shape))
        tensor.contents.int64_contents.extend(feeds[name].ravel().tolist())
    with grpclib.insecure_channel(f"127.0.0.1:{server.server.grpc_port}") as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.outputs[0].name == "last_hidden_state"
    assert list(response.outputs[0].shape) == [2, 9, 32]
    raw = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 9, 32)
    assert np.array_equal(raw, want)


def test_text_input_is_tokenized_on_the_server(
    http: httpclient.InferenceServerClient,
    grpc: grpcclient.InferenceServerClient,
    runner: Any,
    tiny_bert_engine: Path,
) -> None:
    texts = ["The cat sat on the mat.", "A much longer sentence about serving engines fast."]
    item = httpclient.InferInput("text", [2], "BYTES")
    item.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    result = http.infer(MODEL, [item])
    hidden, mask = result.as_numpy("last_hidden_state"), result.as_numpy("attention_mask")
    lengths = [text_feeds(tiny_bert_engine, t)["input_ids"].shape[1] for t in texts]
    assert mask.tolist() == [[1] * n + [0] * (max(lengths) - n) for n in lengths]
    for row, text in enumerate(texts):
        # each text row went through the batcher alone or padded with others: its own tokens
        want = runner.infer(text_feeds(tiny_bert_engine, text))["last_hidden_state"][0]
        assert np.allclose(hidden[row, : lengths[row]], want, atol=1e-5)
        assert not hidden[row, lengths[row] :].any()

    one = grpcclient.InferInput("text", [1], "BYTES")
    one.set_data_from_numpy(np.array([texts[1].encode()], dtype=object))
    alone = grpc.infer(MODEL, [one]).as_numpy("last_hidden_state")
    want = runner.infer(text_feeds(tiny_bert_engine, texts[1]))["last_hidden_state"]
    assert np.array_equal(alone, want)


def test_long_text_is_truncated_unless_truncation_is_off(server: ServerThread) -> None:
    text = " ".join(["word"] * 200)
    request = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    status, body = fetch(server, f"/v2/models/{MODEL}/infer", json.dumps(request).encode())
    assert status == 200
    assert json.loads(body)["outputs"][0]["shape"] == [1, 64, 32]
    request["parameters"] = {"truncation": False}
    status, body = fetch(server, f"/v2/models/{MODEL}/infer", json.dumps(request).encode())
    assert status == 400
    assert "text 0 is 202 tokens" in json.loads(body)["error"]
    assert "at most 64" in json.loads(body)["error"]


# -- bad requests -------------------------------------------------------------------------------
def infer_body(tensors: list[dict[str, Any]]) -> bytes:
    return json.dumps({"inputs": tensors}).encode()


def ids_tensor(
    name: str = "input_ids", datatype: str = "INT64", shape: list[int] | None = None
) -> dict[str, Any]:
    shape = shape or [1, 4]
    return {"name": name, "datatype": datatype, "shape": shape, "data": [1] * int(np.prod(shape))}


def good_tensors(length: int = 4, batch: int = 1) -> list[dict[str, Any]]:
    return [ids_tensor(name, shape=[batch, length]) for name in NAMES]


def lying_binary_body() -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "INT64",
                    "shape": [1, 4],
                    "parameters": {"binary_data_size": 32},
                }
                for name in NAMES
            ]
        }
    ).encode()
    body = header + b"\0" * 80  # 96 bytes claimed, 80 sent
    return body, {"Inference-Header-Content-Length": str(len(header))}


BAD_REQUESTS = {
    "unknown input": (
        infer_body([*good_tensors(), ids_tensor("pixel_values")]),
        {},
        "unknown input 'pixel_values'",
    ),
    "wrong dtype": (
        infer_body([ids_tensor(datatype="FP32"), *good_tensors()[1:]]),
        {},
        "input 'input_ids' has datatype FP32, model 'tiny' expects INT64",
    ),
    "wrong rank": (
        infer_body([ids_tensor(shape=[4]), *good_tensors()[1:]]),
        {},
        "input 'input_ids' has shape [4], model 'tiny' expects rank 2",
    ),
    "too long": (
        infer_body(good_tensors(length=65)),
        {},
        "input 'input_ids' has sequence length 65, model 'tiny' accepts 1..64",
    ),
    "batch too big": (
        infer_body(good_tensors(batch=9)),
        {},
        "batch size 9, model 'tiny' accepts at most 8",
    ),
    "missing input": (infer_body(good_tensors()[:2]), {}, "missing input(s) ['token_type_ids']"),
    "data count": (
        infer_body([{**ids_tensor(), "data": [1, 2]}, *good_tensors()[1:]]),
        {},
        "needs 4 elements, 'data' has 2",
    ),
    "malformed json": (b'{"inputs": [', {}, "malformed JSON"),
    "binary lies": (*lying_binary_body(), "runs past the end of the body"),
    "header length lies": (
        infer_body(good_tensors()),
        {"Inference-Header-Content-Length": "99999"},
        "outside the body",
    ),
    "oversized body": (b"x" * ((1 << 20) + 10), {}, "over the server limit of 1048576 bytes"),
    "unknown output": (
        json.dumps({"inputs": good_tensors(), "outputs": [{"name": "logits"}]}).encode(),
        {},
        "unknown output 'logits'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_400_and_the_server_keeps_serving(
    server: ServerThread, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    body, headers, message = BAD_REQUESTS[case]
    status, raw = fetch(server, f"/v2/models/{MODEL}/infer", body, headers)
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert message in error
    assert "Traceback" not in error
    status, raw = fetch(server, f"/v2/models/{MODEL}/infer", infer_body(good_tensors()))
    assert status == 200 and json.loads(raw)["outputs"][0]["shape"] == [1, 4, 32]
    assert not [r for r in caplog.records if r.exc_info], "a user mistake logged a traceback"


def test_unknown_model_and_version_are_404(
    server: ServerThread, grpc: grpcclient.InferenceServerClient
) -> None:
    status, raw = fetch(server, "/v2/models/nope/infer", infer_body(good_tensors()))
    assert status == 404 and json.loads(raw)["error"].startswith(
        "Request for unknown model: 'nope' is not found"
    )
    status, raw = fetch(server, f"/v2/models/{MODEL}/versions/3/infer", infer_body(good_tensors()))
    assert status == 404 and "'tiny' version 3 is not found" in json.loads(raw)["error"]
    status, _ = fetch(server, f"/v2/models/{MODEL}/versions/1/infer", infer_body(good_tensors()))
    assert status == 200
    status, raw = fetch(server, "/v2/nothing/here")
    assert status == 404 and "error" in json.loads(raw)
    with pytest.raises(InferenceServerException) as error:
        grpc.get_model_metadata("nope")
    assert error.value.status() == "StatusCode.NOT_FOUND"


def test_grpc_bad_requests_are_invalid_argument(grpc: grpcclient.InferenceServerClient) -> None:
    feeds = random_feeds(np.random.default_rng(3), batch=1, length=70)
    with pytest.raises(InferenceServerException) as error:
        grpc.infer(MODEL, grpc_inputs(feeds))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "sequence length 70" in error.value.message()
    item = grpcclient.InferInput("input_ids", [1, 4], "FP32")
    item.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(InferenceServerException) as error:
        grpc.infer(MODEL, [item])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "datatype FP32" in error.value.message()
    assert grpc.is_server_ready()


# -- concurrency, statistics, metrics -----------------------------------------------------------
def stats(http: httpclient.InferenceServerClient) -> dict[str, Any]:
    doc: dict[str, Any] = http.get_inference_statistics(MODEL)["model_stats"][0]
    return doc


def test_64_concurrent_clients_each_get_their_own_rows(
    server: ServerThread, http: httpclient.InferenceServerClient, runner: Any
) -> None:
    import tritonclient.http.aio as aioclient

    rng = np.random.default_rng(4)
    requests = [random_feeds(rng, batch=1, length=int(n)) for n in rng.integers(3, 40, size=64)]
    before = stats(http)

    async def one(index: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        client = aioclient.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
        try:
            inputs = []
            for name in NAMES:
                item = aioclient.InferInput(name, list(feeds[name].shape), "INT64")
                item.set_data_from_numpy(feeds[name], binary_data=index % 2 == 0)
                inputs.append(item)
            result = await client.infer(MODEL, inputs)
            return result.as_numpy("last_hidden_state")
        finally:
            await client.close()

    async def everyone() -> list[np.ndarray]:
        return await asyncio.gather(*(one(i, f) for i, f in enumerate(requests)))

    started = time.perf_counter()
    results = asyncio.run(everyone())
    elapsed = time.perf_counter() - started
    after = stats(http)

    assert len(results) == 64
    for feeds, got in zip(requests, results, strict=True):
        want = runner.infer(feeds)["last_hidden_state"]
        assert got.shape == want.shape  # own length back, whatever the batch was padded to
        assert np.allclose(got, want, atol=1e-4), float(np.abs(got - want).max())
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 64
    assert inferences / executions > 1.0, (inferences, executions)
    success = after["inference_stats"]["success"]["count"]
    assert success - before["inference_stats"]["success"]["count"] == 64
    learnt = after["launch_overhead_positions"]  # null until 32 launches can tell it
    assert learnt >= 0 if learnt is not None else "launch_overhead_positions" in after
    assert after["execution_count"] >= 32 or learnt is None
    print(f"64 clients in {elapsed:.2f}s, mean batch {inferences / executions:.2f}")


def prometheus(server: ServerThread) -> dict[str, float]:
    """Sum of each /metrics family of MODEL over its devices (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, raw = fetch(server, "/metrics")
    assert status == 200
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            if sample.labels.get("model") == MODEL:
                sums[family.name] = sums.get(family.name, 0.0) + sample.value
    return sums


def test_statistics_and_metrics_agree(
    server: ServerThread, http: httpclient.InferenceServerClient
) -> None:
    """This test's own traffic (2 good requests of 1 and 2 rows, 1 bad) moves both reports by
    exactly that, whatever ran before; and both reports agree on the totals."""
    before, before_metrics = stats(http), prometheus(server)
    for rows in (1, 2):
        status, _ = fetch(server, f"/v2/models/{MODEL}/infer", infer_body(good_tensors(batch=rows)))
        assert status == 200
    bad = infer_body([ids_tensor(datatype="FP32"), *good_tensors()[1:]])
    assert fetch(server, f"/v2/models/{MODEL}/infer", bad)[0] == 400
    doc, got = stats(http), prometheus(server)

    assert doc["name"] == MODEL and doc["version"] == "1"
    assert http.get_inference_statistics()["model_stats"][0]["name"] == MODEL
    success, fail = doc["inference_stats"]["success"], doc["inference_stats"]["fail"]
    assert success["count"] - before["inference_stats"]["success"]["count"] == 2
    assert fail["count"] - before["inference_stats"]["fail"]["count"] == 1
    assert doc["inference_count"] - before["inference_count"] == 3
    assert doc["execution_count"] - before["execution_count"] == 2
    assert sum(b["compute_infer"]["count"] for b in doc["batch_stats"]) == doc["execution_count"]
    deltas = {name: got[name] - before_metrics[name] for name in got}
    assert deltas["nv_inference_request_success"] == 2
    assert deltas["nv_inference_request_failure"] == 1
    assert deltas["nv_inference_count"] == 3
    assert deltas["nv_inference_exec_count"] == 2
    assert deltas["nv_device_failure_count"] == 0
    # the two reports read the same counters
    assert got["nv_inference_request_success"] == success["count"]
    assert got["nv_inference_request_failure"] == fail["count"]
    assert got["nv_inference_count"] == doc["inference_count"]
    assert got["nv_inference_exec_count"] == doc["execution_count"]
    assert got["nv_device_healthy"] == 2  # both CPU workers


def test_metrics_export_the_process_and_the_event_loop_cpu(server: ServerThread) -> None:
    """prometheus-client's standard process metrics, and the CPU seconds of the event loop's
    thread alone (the served-text bench divides both by the requests of a level). The server
    runs in this test's process, so the process figure also holds the test's own CPU."""
    from prometheus_client.parser import text_string_to_metric_families

    process, loop = "process_cpu_seconds_total", "trtpipe_event_loop_cpu_seconds_total"

    def cpu() -> dict[str, float]:
        status, raw = fetch(server, "/metrics")
        assert status == 200
        families = text_string_to_metric_families(raw.decode())
        return {s.name: s.value for f in families for s in f.samples if s.name in (process, loop)}

    before = cpu()
    for _ in range(10):
        status, _ = fetch(server, f"/v2/models/{MODEL}/infer", infer_body(good_tensors()))
        assert status == 200
    after = cpu()
    assert after[loop] > before[loop] > 0
    assert after[process] >= before[process] > before[loop]


def test_keep_alive_requests_are_not_delayed_by_nagle(server: ServerThread) -> None:
    """Responses go out at once on a reused connection: the server's accepted socket has
    TCP_NODELAY (without it keep-alive clients wait ~40 ms per response, Nagle against delayed
    ACKs). Checked on the socket itself, as a timing check flakes on a loaded machine."""
    import http.client
    import os
    import socket
    import stat

    from trtpipe.server.app import listen

    with listen("127.0.0.1", 0, "HTTP") as sock:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY only then
    connection = http.client.HTTPConnection("127.0.0.1", server.server.http_port)
    connection.connect()
    body = infer_body(good_tensors())
    for _ in range(3):
        connection.request("POST", f"/v2/models/{MODEL}/infer", body=body)
        response = connection.getresponse()
        assert response.status == 200 and response.read()
    # The server runs in this process: find its end of our connection among our descriptors.
    client_end = connection.sock.getsockname()
    server_ends = []
    for fd in range(3, 4096):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
        except OSError:
            continue
        with socket.socket(fileno=os.dup(fd)) as candidate:
            try:
                if candidate.getpeername() == client_end:
                    server_ends.append(candidate.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            except OSError:
                continue
    connection.close()
    assert len(server_ends) == 1 and server_ends[0] != 0, server_ends


def test_compressed_request_bodies(http: httpclient.InferenceServerClient, runner: Any) -> None:
    feeds = random_feeds(np.random.default_rng(11), batch=2, length=7)
    want = runner.infer(feeds)["last_hidden_state"]
    for algorithm in ("gzip", "deflate"):
        result = http.infer(
            MODEL, http_inputs(feeds, True), request_compression_algorithm=algorithm
        )
        assert np.array_equal(result.as_numpy("last_hidden_state"), want)


@pytest.mark.parametrize(
    "path",
    [
        f"/v2/models/{MODEL}/generate",
        f"/v2/models/{MODEL}/versions/1/generate_stream",
        "/v1/completions",
        "/v1/chat/completions",
    ],
)
def test_a_generation_route_on_a_server_without_a_generation_model_says_why(
    server: ServerThread, path: str
) -> None:
    status, raw = fetch(server, path, b'{"model": "tiny", "prompt": "hi", "text_input": "hi"}')
    assert status == 404
    assert json.loads(raw)["error"] == (
        f"Not Found: POST {path}; this server serves no text-generation model (its models "
        "['tiny'] take POST /v2/models/NAME/infer); to generate, serve a decoder engine "
        "(trtpipe export MODEL --task text-generation-with-past, then trtpipe build)"
    )
    status, raw = fetch(server, "/v2/models/tiny/generatex", b"{}")
    assert status == 404 and json.loads(raw)["error"] == "Not Found: POST /v2/models/tiny/generatex"
