"""Failures under a real server: a device that raises mid-batch, a full queue, timeouts, draining.

The runners are test doubles (``ScriptedRunner``) wrapping the real ONNX Runtime runner, injected
through the model repository's pool factory.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.server_utils import (
    fetch,
    json_infer_body,
    random_feeds,
    reference_runner,
    scripted_pool,
    start_server,
)
from trtpipe.server.app import ServerThread

MODEL = "tiny"


def port(thread: ServerThread) -> int:
    value = thread.server.http_port
    assert value is not None
    return value


def infer(thread: ServerThread, feeds: dict[str, np.ndarray]) -> tuple[int, dict[str, Any]]:
    status, body = fetch(port(thread), f"/v2/models/{MODEL}/infer", json_infer_body(feeds))
    return status, json.loads(body)


def hidden(doc: dict[str, Any]) -> np.ndarray:
    output = doc["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def device(doc: dict[str, Any], name: str) -> dict[str, Any]:
    devices = doc["models"][MODEL]["devices"]
    return next(d for d in devices if d["device"] == name)


def test_failing_device_fails_only_its_own_requests(tiny_bert_engine: Path) -> None:
    runner = reference_runner(tiny_bert_engine, workers=2)
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=2,
        pool_factory=scripted_pool(fail_devices={1: 1}, retry_on_failure=False),
    )
    try:
        rng = np.random.default_rng(5)
        requests = [random_feeds(rng, 1, int(n)) for n in rng.integers(4, 30, size=24)]
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda f: infer(thread, f), requests))
        failed = [doc for status, doc in answers if status != 200]
        assert {status for status, _ in answers} <= {200, 500}
        assert 1 <= len(failed) <= 8  # one batch, at most the max batch size
        for doc in failed:
            assert "cpu:1" in doc["error"] and "injected fault" in doc["error"]
        for feeds, (status, doc) in zip(requests, answers, strict=True):
            if status == 200:
                want = runner.infer(feeds)["last_hidden_state"]
                assert np.allclose(hidden(doc), want, atol=1e-4)

        # readiness reports the bad device; the model stays ready on the other one
        status, raw = fetch(port(thread), "/v2/health/ready")
        doc = json.loads(raw)
        assert status == 200 and doc["ready"] is True
        assert device(doc, "cpu:1")["healthy"] is False
        assert "injected fault" in device(doc, "cpu:1")["last_error"]
        assert device(doc, "cpu:0")["healthy"] is True
        status, raw = fetch(port(thread), f"/v2/models/{MODEL}/ready")
        assert status == 200
        _, metrics = fetch(port(thread), "/metrics")
        assert f'nv_device_healthy{{device="cpu:1",model="{MODEL}",version="1"}} 0.0' in (
            metrics.decode()
        )

        # the other device keeps serving everything, bit-exact when alone
        for feeds in requests[:4]:
            status, doc = infer(thread, feeds)
            assert status == 200
            assert np.array_equal(hidden(doc), runner.infer(feeds)["last_hidden_state"])
        status, raw = fetch(port(thread), f"/v2/models/{MODEL}/stats")
        stats = json.loads(raw)["model_stats"][0]
        assert stats["inference_stats"]["fail"]["count"] == len(failed)
        assert stats["inference_stats"]["success"]["count"] == 24 - len(failed) + 4
    finally:
        thread.stop()
        runner.close()


def test_retry_moves_a_failed_batch_to_the_healthy_device(tiny_bert_engine: Path) -> None:
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=2,
        pool_factory=scripted_pool(fail_devices={1: 1}, retry_on_failure=True),
    )
    try:
        rng = np.random.default_rng(6)
        requests = [random_feeds(rng, 1, 8) for _ in range(16)]
        with ThreadPoolExecutor(16) as pool:
            statuses = [s for s, _ in pool.map(lambda f: infer(thread, f), requests)]
        assert statuses == [200] * 16
        _, raw = fetch(port(thread), "/v2/health/ready")
        assert device(json.loads(raw), "cpu:1")["failures"] == 1
    finally:
        thread.stop()


def test_no_healthy_device_means_not_ready(tiny_bert_engine: Path) -> None:
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=2,
        pool_factory=scripted_pool(fail_devices={0: 1, 1: 1}),
    )
    try:
        feeds = random_feeds(np.random.default_rng(7), 1, 6)
        first, second = infer(thread, feeds), infer(thread, feeds)
        assert first[0] == 500 and "cpu:0" in first[1]["error"]
        assert second[0] == 500 and "cpu:1" in second[1]["error"]
        status, _ = fetch(port(thread), "/v2/health/ready")
        assert status == 503
        status, _ = fetch(port(thread), f"/v2/models/{MODEL}/ready")
        assert status == 503
        status, doc = infer(thread, feeds)
        assert status == 503 and "not ready" in doc["error"]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{thread.server.grpc_port}")
        assert client.is_server_live() and not client.is_server_ready()
        assert fetch(port(thread), "/v2/health/live")[0] == 200
    finally:
        thread.stop()


def test_full_queue_is_rejected_quickly(tiny_bert_engine: Path) -> None:
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=1,
        pool_factory=scripted_pool(delay_s=1.0),
        max_batch_size=1,
        max_queue_size=1,
    )
    try:
        feeds = random_feeds(np.random.default_rng(8), 1, 6)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(infer, thread, feeds)  # on the device
            time.sleep(0.2)
            queued = pool.submit(infer, thread, feeds)  # the one queue slot
            time.sleep(0.2)
            started = time.perf_counter()
            status, doc = infer(thread, feeds)
            elapsed = time.perf_counter() - started
            assert status == 503 and "queue is full" in doc["error"]
            assert elapsed < 0.3, elapsed
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{thread.server.grpc_port}")
            item = grpcclient.InferInput("text", [1], "BYTES")
            item.set_data_from_numpy(np.array([b"hello"], dtype=object))
            with pytest.raises(InferenceServerException) as error:
                client.infer(MODEL, [item])
            assert error.value.status() == "StatusCode.UNAVAILABLE"
            assert running.result()[0] == 200 and queued.result()[0] == 200
    finally:
        thread.stop()


def test_request_timeout_is_504_and_sigterm_style_stop_drains(tiny_bert_engine: Path) -> None:
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=1,
        pool_factory=scripted_pool(delay_s=0.5),
        timeout_s=0.2,
    )
    feeds = random_feeds(np.random.default_rng(9), 1, 6)
    status, doc = infer(thread, feeds)
    assert status == 504 and "not answered within 0.2 s" in doc["error"]
    thread.stop()

    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=1,
        pool_factory=scripted_pool(delay_s=0.5),
    )
    http_port = port(thread)
    answers: list[tuple[int, dict[str, Any]]] = []
    worker = threading.Thread(target=lambda: answers.append(infer(thread, feeds)))
    worker.start()
    time.sleep(0.2)  # the request is accepted and running
    assert thread.server.repository.models[MODEL].devices_status()[0]["inflight"] == 1
    thread.stop()  # what SIGTERM does: stop accepting, finish what was accepted
    worker.join(10)
    assert answers and answers[0][0] == 200
    assert hidden(answers[0][1]).shape == (1, 6, 32)
    with pytest.raises(OSError):
        fetch(http_port, "/v2/health/live", timeout=2)
