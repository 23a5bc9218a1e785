"""SIGTERM loses nothing that was sent: ``trtpipe serve`` as a subprocess, its real signal handler.

Requests are held running and queued at the signal by a gate in front of the runner
(``tests/gated_serve.py``), not by sleeps. Only ``ConnectionRefusedError`` counts as refused:
a reset connection is a lost request and fails the test.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_server_cli import free_port, wait_ready
from tests.server_utils import fetch, json_infer_body, random_feeds

REPO = Path(__file__).resolve().parents[2]
MODEL = "bert"


def serve(engine: Path, http_port: int, grpc_port: int, gate: Path | None) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    module = "trtpipe.cli.main"
    if gate is not None:
        env["TRTPIPE_TEST_GATE"] = str(gate)
        module = "tests.gated_serve"
    return subprocess.Popen(
        [
            *(sys.executable, "-m", module, "serve"),
            *("--name", f"{MODEL}={engine}", "--devices", "cpu:1", "--no-warmup"),
            *("--http-port", str(http_port), "--grpc-port", str(grpc_port)),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_process(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    _, stderr = process.communicate()
    return code, stderr


def metric(port: int, name: str) -> float:
    status, raw = fetch(port, "/metrics", timeout=5)
    assert status == 200
    for line in raw.decode().splitlines():
        if line.startswith(f"{name}{{") and f'model="{MODEL}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll an outcome the server reaches on its own (what is tested is the state, not time)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def connection(port: int) -> http.client.HTTPConnection:
    """A kept-alive connection, opened and used once before the test's signal."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/v2/health/live")
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("connection") != "close"
    response.read()
    return conn


def request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None
) -> tuple[int, str | None, bytes]:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.getheader("connection"), response.read()


def refused(port: int) -> bool:
    """True once a new connection is refused (the listener is closed)."""
    try:
        fetch(port, "/v2/health/ready", timeout=5)
    except urllib.error.URLError as error:
        if isinstance(error.reason, ConnectionRefusedError):
            return True
        raise
    return False


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gate"
    os.mkfifo(path)
    yield path


def test_requests_running_and_queued_at_sigterm_all_get_200(
    tiny_bert_engine: Path, gate: Path
) -> None:
    http_port, grpc_port = free_port(), free_port()
    process = serve(tiny_bert_engine, http_port, grpc_port, gate)
    # the test's end of the gate; O_RDWR so opening never waits for the server's end
    release = os.open(gate, os.O_RDWR)
    try:
        wait_ready(http_port, process)
        rng = np.random.default_rng(3)
        bodies = [json_infer_body(random_feeds(rng, 1, int(n))) for n in (5, 9, 9, 12, 5, 7)]
        idle = [connection(http_port) for _ in range(3)]
        held = [connection(http_port) for _ in bodies]
        unused = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
        unused.connect()  # accepted before the signal, its request not sent yet
        with ThreadPoolExecutor(len(bodies) + 1) as clients:
            path = f"/v2/models/{MODEL}/infer"
            # one request runs (held at the gate), then five queue behind it
            futures = [clients.submit(request, held[0], "POST", path, bodies[0])]
            wait_for(lambda: metric(http_port, "nv_device_busy") == 1, "a running batch")
            futures += [
                clients.submit(request, conn, "POST", path, body)
                for conn, body in zip(held[1:], bodies[1:], strict=True)
            ]
            wait_for(
                lambda: metric(http_port, "nv_inference_pending_request_count") == 5,
                "five queued requests",
            )
            process.send_signal(signal.SIGTERM)
            wait_for(lambda: refused(http_port), "the listener to close")

            # draining: kept-alive connections are answered 503 + Connection: close, not reset
            status, close, raw = request(idle[0], "GET", "/v2/health/ready")
            assert (status, close) == (503, "close")
            assert json.loads(raw)["draining"] is True
            status, close, raw = request(idle[1], "POST", path, bodies[0])
            assert (status, close) == (503, "close")
            assert "shutting down" in json.loads(raw)["error"]
            status, close, raw = request(idle[2], "POST", "/v1/embeddings", b'{"input": "hi"}')
            assert (status, close) == (503, "close")
            assert json.loads(raw)["error"]["type"] == "server_error"
            assert not any(f.done() for f in futures), "a held request finished early"
            # a connection accepted before the listener closed: its first request is served
            futures.append(clients.submit(request, unused, "POST", path, bodies[1]))

            os.write(release, b"x" * 16)  # let every batch run
            answers = [f.result(timeout=60) for f in futures]
        code, stderr = stop_process(process)
    finally:
        os.write(release, b"x" * 16)
        os.close(release)
        if process.poll() is None:
            process.kill()
    assert code == 0, stderr
    for status, close, raw in answers:
        assert status == 200, raw
        assert close == "close"  # answered during the drain: the client opens a new connection
        assert json.loads(raw)["outputs"][0]["name"] == "last_hidden_state"
    assert "Traceback" not in stderr and "server stopped" in stderr


def test_sigterm_under_load_resets_nothing(tiny_bert_engine: Path) -> None:
    """16 clients loop through the signal, half on kept-alive connections and half on a new
    connection per request. A request sent before the signal gets 200 (or, had the server begun
    draining before it read it, 503 + Connection: close); after it, a new connection may also be
    refused. Nothing is reset, except a new connection opened after the signal that the kernel
    completed just as the listener closed (TCP resets those; no server can accept them)."""
    http_port, grpc_port = free_port(), free_port()
    process = serve(tiny_bert_engine, http_port, grpc_port, gate=None)
    answered = threading.Semaphore(0)
    signalled = threading.Event()
    try:
        wait_ready(http_port, process)
        body = json_infer_body(random_feeds(np.random.default_rng(4), 1, 16))

        def client(keep_alive: bool) -> list[tuple[bool, bool, str]]:
            """(kept alive, sent before the signal, outcome) of each request, until one is not
            a 200."""
            outcomes: list[tuple[bool, bool, str]] = []
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
            while True:
                before = not signalled.is_set()
                reused = conn.sock is not None
                try:
                    if not reused:
                        # A new connection counts as sent before the signal only if it opened
                        # before it: http.client would otherwise connect lazily, after the flag.
                        conn.connect()
                        before = not signalled.is_set()
                    status, close, _ = request(conn, "POST", f"/v2/models/{MODEL}/infer", body)
                except ConnectionRefusedError:
                    # Refused only once the listener closed, which is after the signal.
                    before, outcome = not signalled.is_set(), "refused"
                except (OSError, http.client.HTTPException) as error:  # reset, closed unanswered
                    outcome = repr(error)
                else:
                    outcome = f"{status} {close}"
                outcomes.append((reused, before, outcome))
                answered.release()
                if not outcome.startswith("200"):
                    return outcomes
                if close == "close" or not keep_alive:
                    conn.close()  # as any client does; the next request opens a new one

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(client, i % 2 == 0) for i in range(16)]
            for _ in range(64):  # the load is on: 64 answers before the signal
                assert answered.acquire(timeout=60)
            signalled.set()
            process.send_signal(signal.SIGTERM)
            outcomes = [o for f in futures for o in f.result(timeout=90)]
        code, stderr = stop_process(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0, stderr
    before = {outcome for _, sent_before, outcome in outcomes if sent_before}
    assert before <= {"200 None", "200 close", "503 close"}, before
    kept_alive = {outcome for reused, _, outcome in outcomes if reused}
    assert kept_alive <= {"200 None", "200 close", "503 close"}, kept_alive
    new_after = {outcome for reused, _, outcome in outcomes if not reused}
    new_after -= {"200 None", "200 close", "503 close", "refused"}
    assert all("ConnectionResetError" in outcome for outcome in new_after), new_after
    assert len([o for o in outcomes if o[2].startswith("200")]) >= 64
    assert "Traceback" not in stderr and "server stopped" in stderr
