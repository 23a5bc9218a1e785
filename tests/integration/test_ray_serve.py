"""trtpipe on Ray Serve: 2 CPU replicas behind Ray's HTTP proxy answer tritonclient (JSON and
binary tensors) and the openai client exactly as plain ``trtpipe serve`` does; the proxy's
overhead is measured against plain serve in the same run (printed, not asserted).

Skips without ``ray[serve]`` (pip install 'trtpipe[ray]'). Starting a local Ray takes tens of
seconds, so everything shares one module-scoped cluster, under a hard timeout.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.server_utils import start_server
from tests.tensor_models import matmul_relu_weight, save_matmul_relu
from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.deploy.ray import RayOptions, build_application, ray_available
from trtpipe.server.app import ServerThread

pytestmark = [
    pytest.mark.skipif(not ray_available(), reason="ray[serve] is not installed"),
    pytest.mark.timeout(900),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, tiny_bert_engine: Path) -> Path:
    """A repository: mm (plain tensors) and bert (the tiny BERT, text and embeddings)."""
    import shutil

    root = tmp_path_factory.mktemp("ray")
    onnx_path = save_matmul_relu(root / "src" / "mm.onnx")
    build_engine_dir(BuildConfig(onnx_path=onnx_path, output=root / "repo" / "mm"))
    shutil.copytree(tiny_bert_engine, root / "repo" / "bert")
    return root / "repo"


@pytest.fixture(scope="module")
def ray_port(engines: Path) -> Iterator[int]:
    import ray
    from ray import serve

    port = free_port()
    # Ray Serve gives its HTTP proxy 5 s to import and answer a readiness check; on a loaded
    # 2-core machine that import alone can take longer, and the proxy is then killed in a loop.
    # Ray also runs its workers (the replicas) at nice 15: beside other work on two cores they
    # starve for minutes. The raylet and its workers inherit this environment from ray.init.
    slow_machine = {
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
        "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "120",
        "RAY_worker_niceness": "0",
    }
    saved = {name: os.environ.get(name) for name in slow_machine}
    os.environ.update(slow_machine)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = RayOptions(engines=[str(engines)], replicas=2, cpus=1)
        serve.run(build_application(options), name="trtpipe", route_prefix="/")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def plain(engines: Path) -> Iterator[ServerThread]:
    thread = start_server([str(engines)], devices=1, grpc=False)
    yield thread
    thread.stop()


def infer(port: int, x: np.ndarray, binary: bool) -> np.ndarray:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    output = httpclient.InferRequestedOutput("y", binary_data=binary)
    result: np.ndarray = client.infer("mm", [tensor], outputs=[output]).as_numpy("y")
    return result


def test_two_replicas_run(ray_port: int) -> None:
    from ray import serve

    status = serve.status().applications["trtpipe"].deployments["trtpipe"]
    assert status.status == "HEALTHY"
    assert status.replica_states.get("RUNNING") == 2


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_through_the_proxy(ray_port: int, plain: ServerThread, binary: bool) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{ray_port}")
    assert client.is_server_ready() and client.is_model_ready("mm")
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    through_ray = infer(ray_port, x, binary)
    assert plain.server.http_port is not None
    np.testing.assert_array_equal(through_ray, infer(plain.server.http_port, x, binary))
    np.testing.assert_allclose(through_ray, np.maximum(x @ matmul_relu_weight(), 0), atol=1e-5)


def test_openai_embeddings_through_the_proxy(ray_port: int, plain: ServerThread) -> None:
    from openai import OpenAI

    texts = ["the cat sat on the mat", "a quick brown fox"]

    def embed(port: Any) -> np.ndarray:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        response = client.embeddings.create(model="bert", input=texts)
        return np.array([d.embedding for d in response.data])

    through_ray = embed(ray_port)
    assert through_ray.shape[0] == 2 and through_ray.shape[1] > 0
    np.testing.assert_allclose(through_ray, embed(plain.server.http_port), atol=1e-6)


CLIENTS = 8


def concurrent_throughput(port: int, per_client: int = 40, runs: int = 3) -> float:
    """Median requests/s of CLIENTS threads, each with its own client, sending one-row requests."""
    from concurrent.futures import ThreadPoolExecutor

    def client_loop() -> None:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = httpclient.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32), binary_data=True)
        for _ in range(per_client):
            client.infer("mm", [tensor])

    rates = []
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda _: client_loop(), range(CLIENTS)))  # warm-up
        for _ in range(runs):
            start = time.perf_counter()
            list(pool.map(lambda _: client_loop(), range(CLIENTS)))
            rates.append(CLIENTS * per_client / (time.perf_counter() - start))
    return statistics.median(rates)


def test_proxy_overhead_against_plain_serve(ray_port: int, plain: ServerThread) -> None:
    """Median latency of one small binary request, sequential, after warm-up (same run)."""
    x = np.ones((1, 4), np.float32)
    assert plain.server.http_port is not None
    medians = {}
    for label, port in (("plain", plain.server.http_port), ("ray", ray_port)):
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = httpclient.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        for _ in range(20):
            client.infer("mm", [tensor])
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(50):
                client.infer("mm", [tensor])
            runs.append((time.perf_counter() - start) / 50)
        medians[label] = statistics.median(runs)
    throughput = {
        label: concurrent_throughput(port)
        for label, port in (("plain", plain.server.http_port), ("ray", ray_port))
    }
    print(
        f"\nthroughput, {CLIENTS} concurrent clients: plain {throughput['plain']:.0f} req/s, "
        f"through Ray Serve {throughput['ray']:.0f} req/s "
        f"(x{throughput['ray'] / throughput['plain']:.2f})"
    )
    print(
        f"median latency per request: plain {1000 * medians['plain']:.2f} ms, "
        f"through Ray Serve {1000 * medians['ray']:.2f} ms "
        f"(+{1000 * (medians['ray'] - medians['plain']):.2f} ms, "
        f"x{medians['ray'] / medians['plain']:.2f})"
    )
    assert medians["ray"] > 0 and medians["plain"] > 0
