"""Exact Prometheus counters after known traffic, on a server of this test's own.

Good, bad (400) and device-failed (500) requests over HTTP and gRPC are sent one at a time
against two round-robin CPU workers, so every figure is known in advance: requests succeeded
and failed per model, rows and executions per device, the device's failures and health. The
statistics extension must report the same figures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.server_utils import fetch, json_infer_body, random_feeds, scripted_pool, start_server
from trtpipe.engine import EngineDir
from trtpipe.runtime.pool import DevicePool
from trtpipe.server.app import ServerThread
from trtpipe.server.config import ServeConfig

MODEL = "tiny"
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def no_reload_pool(engine: EngineDir, config: ServeConfig) -> DevicePool:
    """cpu:1 faults from its third batch (test double) and stays down: no background reload."""
    pool = scripted_pool(fail_devices={1: 3}, retry_on_failure=False)(engine, config)
    pool.reload_backoff = None
    return pool


@pytest.fixture(scope="module")
def server(tiny_bert_engine: Path) -> Iterator[ServerThread]:
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=2,
        pool_factory=no_reload_pool,
        policy="round_robin",
    )
    yield thread
    thread.stop()


def metrics(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics by (family name, labels), parsed by prometheus_client's parser
    (which reads counters as ``NAME_total``; the wire keeps Triton's names, checked here too)."""
    status, raw = fetch(port, "/metrics")
    assert status == 200
    text = raw.decode()
    assert "nv_inference_request_success{" in text
    assert not [line for line in text.splitlines() if line.startswith("nv_") and "_total" in line]
    return {
        (family.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def model_labels(**extra: str) -> frozenset[tuple[str, str]]:
    return frozenset({"model": MODEL, "version": "1", **extra}.items())


def http_infer(port: int, rows: int, seed: int) -> tuple[int, dict[str, Any]]:
    body = json_infer_body(random_feeds(np.random.default_rng(seed), rows, 6))
    status, raw = fetch(port, f"/v2/models/{MODEL}/infer", body)
    return status, json.loads(raw)


def grpc_infer(client: grpcclient.InferenceServerClient, rows: int, seed: int) -> np.ndarray:
    feeds = random_feeds(np.random.default_rng(seed), rows, 5)
    inputs = []
    for name in NAMES:
        item = grpcclient.InferInput(name, list(feeds[name].shape), "INT64")
        item.set_data_from_numpy(feeds[name])
        inputs.append(item)
    result: np.ndarray = client.infer(MODEL, inputs).as_numpy("last_hidden_state")
    return result


def test_metrics_count_known_good_bad_and_device_failed_traffic(server: ServerThread) -> None:
    port = server.server.http_port
    assert port is not None
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.server.grpc_port}")

    start = metrics(port)
    assert start[("nv_inference_request_success", model_labels())] == 0
    assert start[("nv_inference_count", model_labels(device="cpu:0"))] == 0

    # good: round-robin deals cpu:0, cpu:1, cpu:0, cpu:1 (cpu:1 runs its 1st and 2nd batch)
    assert http_infer(port, 1, 1)[0] == 200
    assert http_infer(port, 2, 2)[0] == 200
    assert grpc_infer(client, 3, 3).shape == (3, 5, 32)
    assert grpc_infer(client, 1, 4).shape == (1, 5, 32)

    # bad: rejected before any device runs them, but counted as failed requests of the model
    tensors = [{"name": n, "datatype": "FP32", "shape": [1, 2], "data": [1, 2]} for n in NAMES]
    wrong_dtype = json.dumps({"inputs": tensors}).encode()
    for _ in range(2):
        status, raw = fetch(port, f"/v2/models/{MODEL}/infer", wrong_dtype)
        assert status == 400 and "datatype FP32" in json.loads(raw)["error"]
    item = grpcclient.InferInput("input_ids", [1, 70], "INT64")
    item.set_data_from_numpy(np.ones((1, 70), dtype=np.int64))
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [item])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    # unknown model: no model's counter moves
    assert fetch(port, "/v2/models/nope/infer", wrong_dtype)[0] == 404

    # cpu:0 runs its 3rd batch; cpu:1 faults on its 3rd (500), then only cpu:0 is dealt to
    assert http_infer(port, 2, 5)[0] == 200
    status, doc = http_infer(port, 1, 6)
    assert status == 500 and "injected fault" in doc["error"] and "cpu:1" in doc["error"]
    assert grpc_infer(client, 1, 7).shape == (1, 5, 32)

    got = metrics(port)
    expected = {
        ("nv_inference_request_success", model_labels()): 6,
        ("nv_inference_request_failure", model_labels()): 4,
        ("nv_inference_count", model_labels(device="cpu:0")): 1 + 3 + 2 + 1,
        ("nv_inference_count", model_labels(device="cpu:1")): 2 + 1,
        ("nv_inference_exec_count", model_labels(device="cpu:0")): 4,
        ("nv_inference_exec_count", model_labels(device="cpu:1")): 2,
        ("nv_device_failure_count", model_labels(device="cpu:0")): 0,
        ("nv_device_failure_count", model_labels(device="cpu:1")): 1,
        ("nv_device_healthy", model_labels(device="cpu:0")): 1,
        ("nv_device_healthy", model_labels(device="cpu:1")): 0,
        ("nv_device_busy", model_labels(device="cpu:0")): 0,
        ("nv_inference_pending_request_count", model_labels()): 0,
        ("nv_model_ready", model_labels()): 1,
    }
    assert {key: got[key] for key in expected} == expected
    for name in ("duration_us", "queue_duration_us", "compute_infer_duration_us"):
        key = (f"nv_inference_{'request_' if name == 'duration_us' else ''}{name}", model_labels())
        assert got[key] > 0, key

    # the statistics extension reports the same figures, over HTTP and gRPC
    status, raw = fetch(port, f"/v2/models/{MODEL}/stats")
    stats = json.loads(raw)["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == 6
    assert stats["inference_stats"]["fail"]["count"] == 4
    assert stats["inference_count"] == 10
    assert stats["execution_count"] == 6
    grpc_stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(grpc_stats["inference_count"]) == 10
    assert int(grpc_stats["execution_count"]) == 6
    assert int(grpc_stats["inference_stats"]["fail"]["count"]) == 4
