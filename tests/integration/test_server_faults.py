"""Failures under a real server: a device that raises mid-batch and heals, a full queue,
timeouts, draining.

The runners are test doubles (``ScriptedRunner``, ``GatedRunner``) wrapping the real ONNX Runtime
runner, injected through the model repository's pool factory. Gates, not sleeps, order events.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.server_utils import (
    ScriptedRunner,
    fetch,
    json_infer_body,
    random_feeds,
    reference_runner,
    scripted_pool,
    start_server,
)
from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.runners.base import Runner
from trtpipe.runners.onnxruntime import OnnxRuntimeRunner
from trtpipe.runtime.pool import Backoff, DevicePool
from trtpipe.server.app import ServerThread
from trtpipe.server.config import ServeConfig

PoolFactory = Callable[[EngineDir, ServeConfig], DevicePool]

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


def without_reload(factory: PoolFactory) -> PoolFactory:
    """The pool factory with background reloading off: these tests hold one fault still."""

    def make(engine: EngineDir, config: ServeConfig) -> DevicePool:
        pool = factory(engine, config)
        pool.reload_backoff = None
        return pool

    return make


class GatedRunner(ScriptedRunner):
    """Test double: the real runner, but every call waits at ``gate`` (``entered`` says it did)."""

    def __init__(self, inner: Runner, gate: threading.Event, entered: threading.Semaphore):
        super().__init__(inner)
        self.gate, self.entered = gate, entered

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.release()
        assert self.gate.wait(30), "test gate never opened"
        return super()._infer(feeds)


def gated_pool(gate: threading.Event, entered: threading.Semaphore) -> PoolFactory:
    def factory(engine: EngineDir, config: ServeConfig) -> DevicePool:
        def make(device: Device) -> Runner:
            return GatedRunner(OnnxRuntimeRunner(engine, device, threads=1), gate, entered)

        return DevicePool(make, config.devices, config.policy, manifest=engine.manifest)

    return factory


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll a state the server reaches on its own threads (the outcome is tested, not timing)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_failing_device_fails_only_its_own_requests(tiny_bert_engine: Path) -> None:
    runner = reference_runner(tiny_bert_engine, workers=2)
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=2,
        pool_factory=without_reload(scripted_pool(fail_devices={1: 1}, retry_on_failure=False)),
        policy="round_robin",  # the policy that used to deal a second batch to the failing cpu:1
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
        pool_factory=without_reload(scripted_pool(fail_devices={1: 1}, retry_on_failure=True)),
        policy="round_robin",
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
        pool_factory=without_reload(scripted_pool(fail_devices={0: 1, 1: 1})),
    )
    try:
        feeds = random_feeds(np.random.default_rng(7), 1, 6)
        first, second = infer(thread, feeds), infer(thread, feeds)
        assert first[0] == 500 and second[0] == 500
        named = {d for d in ("cpu:0", "cpu:1") for _, doc in (first, second) if d in doc["error"]}
        assert named == {"cpu:0", "cpu:1"}  # each device failed one request
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


def test_full_queue_is_rejected_without_waiting_for_the_device(tiny_bert_engine: Path) -> None:
    gate, entered = threading.Event(), threading.Semaphore(0)
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=1,
        pool_factory=gated_pool(gate, entered),
        max_batch_size=1,
        max_queue_size=1,
    )
    model = thread.server.repository.models[MODEL]
    try:
        feeds = random_feeds(np.random.default_rng(8), 1, 6)
        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(infer, thread, feeds)
            assert entered.acquire(timeout=30)  # on the device, held there
            ahead = pool.submit(infer, thread, feeds)  # the batch prepared ahead of the device
            wait_for(lambda: model.batcher.inflight_batches == 2, "the batch prepared ahead")
            queued = pool.submit(infer, thread, feeds)
            wait_for(lambda: model.batcher.pending == 1, "the third request to take the queue slot")
            status, doc = infer(thread, feeds)
            assert status == 503 and "queue is full" in doc["error"]
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{thread.server.grpc_port}")
            item = grpcclient.InferInput("text", [1], "BYTES")
            item.set_data_from_numpy(np.array([b"hello"], dtype=object))
            with pytest.raises(InferenceServerException) as error:
                client.infer(MODEL, [item])
            assert error.value.status() == "StatusCode.UNAVAILABLE"
            # both rejections came back while the device was still held: nothing waited for it
            assert not running.done() and not queued.done() and model.batcher.pending == 1
            assert model.pending == 2  # the batch prepared ahead and the queued request
            gate.set()
            assert [f.result()[0] for f in (running, ahead, queued)] == [200, 200, 200]
    finally:
        gate.set()
        thread.stop()


def test_request_timeout_is_504_and_sigterm_style_stop_drains(tiny_bert_engine: Path) -> None:
    gate, entered = threading.Event(), threading.Semaphore(0)
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=1,
        pool_factory=gated_pool(gate, entered),
        timeout_s=0.2,
    )
    feeds = random_feeds(np.random.default_rng(9), 1, 6)
    try:
        status, doc = infer(thread, feeds)  # held on the device past its deadline
        assert status == 504 and "not answered within 0.2 s" in doc["error"]
    finally:
        gate.set()
        thread.stop()

    gate, entered = threading.Event(), threading.Semaphore(0)
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"], devices=1, pool_factory=gated_pool(gate, entered)
    )
    http_port = port(thread)
    answers: list[tuple[int, dict[str, Any]]] = []
    worker = threading.Thread(target=lambda: answers.append(infer(thread, feeds)))
    stopper = threading.Thread(target=thread.stop)  # what SIGTERM does
    try:
        worker.start()
        assert entered.acquire(timeout=30)  # the request is accepted and running
        assert thread.server.repository.models[MODEL].devices_status()[0]["inflight"] == 1
        stopper.start()
        wait_for(lambda: thread.server.state.draining, "the stop to begin")
        gate.set()  # the accepted request finishes during the drain
        worker.join(30)
        stopper.join(60)
    finally:
        gate.set()
        thread.stop()
    assert answers and answers[0][0] == 200
    assert hidden(answers[0][1]).shape == (1, 6, 32)
    with pytest.raises(OSError):
        fetch(http_port, "/v2/health/live", timeout=2)


def test_a_faulted_device_is_reloaded_and_the_model_reports_it_healthy_again(
    tiny_bert_engine: Path,
) -> None:
    reload_gate, loads = threading.Event(), threading.Semaphore(0)
    made: dict[int, int] = {}

    def factory(engine: EngineDir, config: ServeConfig) -> DevicePool:
        def make(device: Device) -> Runner:
            made[device.index] = made.get(device.index, 0) + 1
            first = made[device.index] == 1
            if device.index == 1:
                loads.release()
                if not first:  # hold the reload so the test can see the device down
                    assert reload_gate.wait(30), "reload gate never opened"
            inner = OnnxRuntimeRunner(engine, device, threads=1)
            return ScriptedRunner(inner, fail_from_call=1 if device.index == 1 and first else None)

        return DevicePool(
            make,
            config.devices,
            "round_robin",
            retry_on_failure=False,
            manifest=engine.manifest,
            reload_backoff=Backoff(initial_s=0.01, max_s=0.01),
        )

    thread = start_server([f"{MODEL}={tiny_bert_engine}"], devices=2, pool_factory=factory)
    pool = thread.server.repository.models[MODEL].pool
    healthy = 'nv_device_healthy{{device="cpu:1",model="{}",version="1"}} {}'
    try:
        feeds = random_feeds(np.random.default_rng(10), 1, 6)
        assert infer(thread, feeds)[0] == 200  # cpu:0
        status, doc = infer(thread, feeds)  # cpu:1: the injected fault
        assert status == 500 and "injected fault" in doc["error"]
        assert loads.acquire(timeout=30) and loads.acquire(timeout=30)  # reload under way
        _, raw = fetch(port(thread), "/v2/health/ready")
        assert device(json.loads(raw), "cpu:1")["healthy"] is False
        assert device(json.loads(raw), "cpu:1")["state"] == "reloading"
        assert healthy.format(MODEL, "0.0") in fetch(port(thread), "/metrics")[1].decode()
        reload_gate.set()
        assert pool.wait_healthy(2, timeout=30)
        _, raw = fetch(port(thread), "/v2/health/ready")
        cpu1 = device(json.loads(raw), "cpu:1")
        assert cpu1["healthy"] is True and cpu1["reloads"] == 1 and cpu1["failures"] == 1
        assert healthy.format(MODEL, "1.0") in fetch(port(thread), "/metrics")[1].decode()
        for _ in range(4):  # both devices serve again
            assert infer(thread, feeds)[0] == 200
        _, raw = fetch(port(thread), "/v2/health/ready")
        assert device(json.loads(raw), "cpu:1")["executions"] == 2
    finally:
        reload_gate.set()
        thread.stop()
