"""A directory of engine dirs served as a model repository, and Triton's model control through
tritonclient (HTTP and gRPC): index, load, unload, readiness following, drain before unload."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.server_utils import ScriptedRunner
from tests.tensor_models import matmul_relu_weight, save_matmul_relu
from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError
from trtpipe.runtime.pool import DevicePool
from trtpipe.server.app import InferenceServer, ServerConfig, ServerThread
from trtpipe.server.config import ServeConfig
from trtpipe.server.repository import ModelRepository, parse_model_specs

SEEDS = {"alpha": 0, "beta": 1}


class Gate:
    """Holds every batch in the runner while closed; counts the rows that reached it."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.rows = 0
        self.lock = threading.Lock()

    def enter(self, rows: int) -> None:
        with self.lock:
            self.rows += rows
        self.open.wait(30)


GATE = Gate()


@pytest.fixture(scope="module")
def repository_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """repo/alpha, repo/beta: plain-tensor engines (y = relu(x @ W), W differs)."""
    root = tmp_path_factory.mktemp("repo")
    for name, seed in SEEDS.items():
        onnx_path = save_matmul_relu(root / "src" / name / "mm.onnx", weight_seed=seed)
        build_engine_dir(BuildConfig(onnx_path=onnx_path, output=root / "repo" / name))
    return root / "repo"


def gated_pool(engine: EngineDir, config: ServeConfig) -> DevicePool:
    """The real pool; each batch waits at GATE first (so requests stay in flight)."""
    pool = DevicePool.for_engine(engine, config.devices, policy=config.policy)
    real = pool.runner_factory

    class Gated(ScriptedRunner):
        def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            GATE.enter(int(next(iter(feeds.values())).shape[0]))
            return self.inner.infer(feeds)

    pool.runner_factory = lambda device: Gated(real(device))
    return pool


def serve(specs: list[str], mode: str = "none", load: tuple[str, ...] = ()) -> ServerThread:
    config = ServeConfig(devices=[Device("cpu", 0)], warmup=False, max_queue_delay_ms=1.0)
    repository = ModelRepository.from_specs(
        specs, config, pool_factory=gated_pool, control_mode=mode, load=load
    )
    server = InferenceServer(repository, ServerConfig(http_port=0, grpc_port=0, drain_timeout_s=10))
    return ServerThread(server)  # started by ``with`` or .start()


@pytest.fixture(scope="module")
def explicit(repository_dir: Path) -> Iterator[ServerThread]:
    thread = serve([str(repository_dir)], mode="explicit", load=("alpha",)).start()
    yield thread
    thread.stop()


def expected(name: str, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ matmul_relu_weight(SEEDS[name]), 0)


def http_infer(client: httpclient.InferenceServerClient, name: str, x: np.ndarray) -> np.ndarray:
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer(name, [tensor])
    out: np.ndarray = result.as_numpy("y")
    return out


def grpc_infer(client: grpcclient.InferenceServerClient, name: str, x: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    out: np.ndarray = client.infer(name, [tensor]).as_numpy("y")
    return out


# -- which dirs are served, under which names ------------------------------------------------------
def test_a_dir_of_engine_dirs_is_a_repository(repository_dir: Path, tmp_path: Path):
    assert parse_model_specs([str(repository_dir)]) == [
        ("alpha", repository_dir / "alpha"),
        ("beta", repository_dir / "beta"),
    ]
    # One engine dir is served as itself; --name renames a repository's engine.
    assert parse_model_specs([str(repository_dir / "beta")]) == [("beta", repository_dir / "beta")]
    renamed = parse_model_specs([str(repository_dir), f"b2={repository_dir / 'beta'}"])
    assert renamed == [("alpha", repository_dir / "alpha"), ("b2", repository_dir / "beta")]
    # An in-progress atomic build (.NAME.tmp-*) is not a model.
    (repository_dir / ".gamma.tmp-1").mkdir(exist_ok=True)
    assert [n for n, _ in parse_model_specs([str(repository_dir)])] == ["alpha", "beta"]


def test_a_triton_layout_is_refused_with_a_hint(tmp_path: Path):
    (tmp_path / "simple" / "1").mkdir(parents=True)
    (tmp_path / "simple" / "config.pbtxt").write_text('name: "simple"\n')
    save_matmul_relu(tmp_path / "simple" / "1" / "model.onnx")
    with pytest.raises(InputError, match=r"laid out as a Triton model.*trtpipe build"):
        parse_model_specs([str(tmp_path)])
    with pytest.raises(InputError, match="laid out as a Triton model"):
        parse_model_specs([str(tmp_path / "simple")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither an engine dir nor a dir of engine dirs"):
        parse_model_specs([str(tmp_path / "empty")])


def test_mode_none_serves_the_whole_repository_and_refuses_control(repository_dir: Path):
    with serve([str(repository_dir)]) as thread:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{thread.server.http_port}")
        x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        for name in SEEDS:
            assert client.is_model_ready(name)
            np.testing.assert_allclose(http_infer(client, name, x), expected(name, x), atol=1e-5)
        with pytest.raises(InferenceServerException, match="model control mode none"):
            client.unload_model("alpha")
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{thread.server.grpc_port}")
        with pytest.raises(InferenceServerException, match="model control mode none") as error:
            grpc.load_model("beta")
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert client.is_model_ready("alpha")


# -- explicit model control ---------------------------------------------------------------------
def test_explicit_mode_starts_with_the_named_models(explicit: ServerThread):
    http = httpclient.InferenceServerClient(f"127.0.0.1:{explicit.server.http_port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{explicit.server.grpc_port}")
    assert http.is_server_ready() and grpc.is_server_ready()
    index = http.get_model_repository_index()
    assert index == [
        {"name": "alpha", "version": "1", "state": "READY"},
        {"name": "beta", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
    ]
    assert grpc.get_model_repository_index(as_json=True)["models"] == index
    assert http.is_model_ready("alpha") and not http.is_model_ready("beta")
    assert grpc.is_model_ready("alpha") and not grpc.is_model_ready("beta")
    x = np.ones((2, 4), np.float32)
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'beta'"):
        http_infer(http, "beta", x)


def test_a_generation_route_naming_an_unloaded_tensor_model_says_it_cannot_generate(
    explicit: ServerThread,
) -> None:
    """Loading beta would not make it generate: the 404 says what it takes instead, and how to
    load it, rather than only how to load it (as for an unloaded decoder)."""
    url = f"http://127.0.0.1:{explicit.server.http_port}"
    assert "beta" not in explicit.server.repository.models
    for path, body in [
        ("/v1/completions", {"model": "beta", "prompt": "Hello"}),
        ("/v2/models/beta/generate", {"text_input": "Hello"}),
    ]:
        reply = httpx.post(url + path, json=body, timeout=30)
        assert reply.status_code == 404, (path, reply.text)
        assert "model 'beta' is not a text-generation engine, and it is not loaded" in reply.text
        assert "/v2/models/beta/infer" in reply.text
        assert "/v2/repository/models/beta/load" in reply.text
    unknown = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "Hi"})
    assert unknown.status_code == 404 and "not a text-generation engine" not in unknown.text


def test_load_and_unload_over_http_and_grpc(explicit: ServerThread):
    http = httpclient.InferenceServerClient(f"127.0.0.1:{explicit.server.http_port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{explicit.server.grpc_port}")
    x = np.random.default_rng(5).standard_normal((4, 4)).astype(np.float32)

    http.load_model("beta")
    assert http.is_model_ready("beta") and grpc.is_model_ready("beta")
    np.testing.assert_allclose(grpc_infer(grpc, "beta", x), expected("beta", x), atol=1e-5)
    http.unload_model("beta")
    assert not http.is_model_ready("beta") and not grpc.is_model_ready("beta")
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'beta'"):
        grpc_infer(grpc, "beta", x)

    grpc.load_model("beta")
    assert http.is_model_ready("beta")
    np.testing.assert_allclose(http_infer(http, "beta", x), expected("beta", x), atol=1e-5)
    assert [m["state"] for m in grpc.get_model_repository_index(as_json=True)["models"]] == [
        "READY",
        "READY",
    ]
    grpc.unload_model("beta")
    assert not grpc.is_model_ready("beta")
    grpc.unload_model("beta")  # unloading an unloaded model is not an error (Triton)
    # A reload of a loaded model swaps it in ready: alpha answers before and after.
    http.load_model("alpha")
    np.testing.assert_allclose(http_infer(http, "alpha", x), expected("alpha", x), atol=1e-5)

    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope'"):
        http.load_model("nope")
    with pytest.raises(InferenceServerException) as error:
        grpc.load_model("nope")
    assert error.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="not supported"):
        http.load_model("beta", config='{"max_batch_size": 4}')
    assert not http.is_model_ready("beta")


def test_startup_heap_is_frozen_and_unloaded_models_are_still_freed(explicit: ServerThread):
    """The server freezes what it loaded (full gc passes skip it), yet a reloaded or unloaded
    model, which the freeze covered, is collected: no engine is leaked by load/unload."""
    import gc
    import weakref

    assert gc.get_freeze_count() > 0
    http = httpclient.InferenceServerClient(f"127.0.0.1:{explicit.server.http_port}")
    x = np.ones((2, 4), dtype=np.float32)
    http.load_model("beta")
    http.load_model("beta")  # a reload: the first beta is retired
    models = explicit.server.repository.models
    first_alpha = weakref.ref(models["alpha"])
    http.load_model("alpha")  # a reload of a model loaded (and frozen) at startup
    assert first_alpha() is None, "the reloaded model was not freed"
    np.testing.assert_allclose(http_infer(http, "alpha", x), expected("alpha", x), atol=1e-5)
    beta = weakref.ref(models["beta"])
    http.unload_model("beta")
    assert beta() is None, "the unloaded model was not freed"
    assert gc.get_freeze_count() > 0


def test_unload_drains_requests_in_flight(explicit: ServerThread):
    """Requests accepted before the unload (one batch running, the rest queued) all complete
    with the right answer; the unload returns after them, and the model is gone."""
    http_port = explicit.server.http_port
    control = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    control.load_model("beta")
    model = explicit.server.repository.models["beta"]
    xs = [np.full((1, 4), i, np.float32) for i in range(1, 7)]

    def one(x: np.ndarray) -> np.ndarray:
        return http_infer(httpclient.InferenceServerClient(f"127.0.0.1:{http_port}"), "beta", x)

    GATE.rows = 0
    GATE.open.clear()
    try:
        with ThreadPoolExecutor(len(xs) + 1) as executor:
            futures = [executor.submit(one, x) for x in xs]
            deadline = time.monotonic() + 20

            def reached() -> int:  # on the device, or pending (prepared ahead of it, or queued)
                return GATE.rows + model.pending

            while reached() < len(xs) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert reached() == len(xs), "requests did not reach the model"
            unload = executor.submit(  # tritonclient's HTTP client stays on its own thread
                lambda: httpclient.InferenceServerClient(f"127.0.0.1:{http_port}").unload_model(
                    "beta"
                )
            )
            time.sleep(0.3)
            assert not unload.done(), "unload returned while requests were in flight"
            states = {m["name"]: m["state"] for m in control.get_model_repository_index()}
            assert states["beta"] == "UNLOADING"
            assert not control.is_model_ready("beta")
            GATE.open.set()
            unload.result(timeout=20)
            results = [f.result(timeout=20) for f in futures]
    finally:
        GATE.open.set()
    for x, y in zip(xs, results, strict=True):
        np.testing.assert_allclose(y, expected("beta", x), atol=1e-5)
    assert not control.is_model_ready("beta")
    assert "beta" not in explicit.server.repository.models
    assert model.pending == 0 and not model.ready


def test_serve_cli_errors_are_one_line(repository_dir: Path, tmp_path: Path):
    from click.testing import CliRunner

    from trtpipe.cli.main import cli

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, ["serve", *args])
        return result.exit_code, result.output

    code, output = run(str(repository_dir), "--load-model", "alpha")
    assert code == 2 and "--load-model needs --model-control-mode explicit" in output
    code, output = run(str(repository_dir), "--model-control-mode", "explicit", "--load-model", "x")
    assert code == 2 and "--load-model ['x']: not in the repository" in output
    (tmp_path / "m" / "1").mkdir(parents=True)
    code, output = run(str(tmp_path))
    assert code == 2 and output.count("error:") == 1 and "laid out as a Triton model" in output
