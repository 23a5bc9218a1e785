"""Server test helpers: a real server on loopback, reference runners, test-double runners."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import RunnerError
from trtpipe.runners.base import Runner
from trtpipe.runners.onnxruntime import OnnxRuntimeRunner
from trtpipe.runtime.pool import DevicePool, cpu_cores
from trtpipe.server.app import InferenceServer, ServerConfig, ServerThread
from trtpipe.server.config import ServeConfig
from trtpipe.server.repository import ModelRepository


def start_server(
    specs: list[str],
    devices: int = 2,
    pool_factory: Callable[[EngineDir, ServeConfig], Any] | None = None,
    max_body_bytes: int = 1 << 20,
    grpc: bool = True,
    grpc_server: str = "auto",
    **serve: Any,
) -> ServerThread:
    """A real server (HTTP + gRPC on free loopback ports) in a background thread."""
    config = ServeConfig(devices=[Device("cpu", i) for i in range(devices)], **serve)
    kwargs = {"pool_factory": pool_factory} if pool_factory else {}
    repository = ModelRepository.from_specs(specs, config, **kwargs)
    server = InferenceServer(
        repository,
        ServerConfig(
            http_port=0,
            grpc_port=0 if grpc else None,
            grpc_server=grpc_server,
            max_body_bytes=max_body_bytes,
            drain_timeout_s=10,
            drain_linger_s=0.2,  # clients in tests keep idle connections open
        ),
    )
    return ServerThread(server).start()


def reference_runner(engine: Path, workers: int = 2) -> OnnxRuntimeRunner:
    """The engine's runner with the thread count a pool of ``workers`` CPU workers uses."""
    runner = OnnxRuntimeRunner(EngineDir(engine), Device("cpu", 0))
    runner.threads = max(1, cpu_cores() // workers)
    runner.load()
    return runner


def text_feeds(engine: Path, text: str) -> dict[str, np.ndarray]:
    """What the server's text path feeds the engine for one text (no padding)."""
    from trtpipe.text import load_tokenizer

    tokenizer = load_tokenizer(str(engine))
    encoded = tokenizer([text], truncation=True, max_length=64)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }
    names = {spec.name for spec in EngineDir(engine).manifest.inputs}
    return {name: array for name, array in feeds.items() if name in names}


def random_feeds(rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    ids = rng.integers(1000, 30000, size=(batch, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
    }


class ScriptedRunner(Runner):
    """Wraps a real runner; on chosen devices it sleeps or raises mid-batch (fault injection)."""

    def __init__(
        self,
        inner: Runner,
        delay_s: float = 0.0,
        fail_from_call: int | None = None,
    ):
        super().__init__(inner.device)
        self.inner = inner
        self.delay_s = delay_s
        self.fail_from_call = fail_from_call
        self.calls = 0
        self.lock = threading.Lock()

    @property
    def inputs(self) -> Any:
        return self.inner.inputs

    @property
    def outputs(self) -> Any:
        return self.inner.outputs

    @property
    def profile(self) -> Any:
        return self.inner.profile

    def load(self) -> None:
        self.inner.load()
        self.loaded = True

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            self.calls += 1
            call = self.calls
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_from_call is not None and call >= self.fail_from_call:
            raise RunnerError(f"{self.device}: injected fault (CUDA error 700) in batch {call}")
        return self.inner.infer(feeds)

    def close(self) -> None:
        self.inner.close()
        super().close()


def scripted_pool(
    delay_s: float = 0.0,
    fail_devices: dict[int, int] | None = None,
    retry_on_failure: bool = False,
) -> Callable[[EngineDir, ServeConfig], DevicePool]:
    """Pool factory of ScriptedRunners; ``fail_devices`` maps device index -> first bad call."""
    fail_devices = fail_devices or {}

    def factory(engine: EngineDir, config: ServeConfig) -> DevicePool:
        threads = max(1, cpu_cores() // len(config.devices))

        def make(device: Device) -> Runner:
            inner = OnnxRuntimeRunner(engine, device, threads=threads)
            return ScriptedRunner(inner, delay_s, fail_devices.get(device.index))

        return DevicePool(
            make,
            config.devices,
            config.policy,
            retry_on_failure=retry_on_failure,
            manifest=engine.manifest,
        )

    return factory


def fetch(
    port: int,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """(status, body) of one HTTP request; error statuses are returned, not raised."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def json_infer_body(feeds: dict[str, np.ndarray]) -> bytes:
    import json

    tensors = [
        {"name": n, "datatype": "INT64", "shape": list(a.shape), "data": a.ravel().tolist()}
        for n, a in feeds.items()
    ]
    return json.dumps({"inputs": tensors}).encode()
