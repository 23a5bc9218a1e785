"""The repository index over gRPC (tritonclient) answers like HTTP's, READY and UNAVAILABLE."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.server_utils import fetch, start_server
from trtpipe.engine import EngineDir
from trtpipe.runtime.pool import DevicePool
from trtpipe.server.app import ServerThread
from trtpipe.server.config import ServeConfig


class SwitchablePool:
    """Test double: the real device pool, with readiness the test can turn off (``down``)."""

    def __init__(self, pool: DevicePool):
        self._pool = pool
        self.down = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    @property
    def ready(self) -> bool:
        return bool(self._pool.ready) and not self.down


def switchable_factory(engine: EngineDir, config: ServeConfig) -> SwitchablePool:
    return SwitchablePool(DevicePool.for_engine(engine, config.devices, policy=config.policy))


@pytest.fixture(scope="module")
def server(tiny_bert_engine: Path) -> Iterator[ServerThread]:
    thread = start_server(
        [f"alpha={tiny_bert_engine}", f"beta={tiny_bert_engine}"],
        devices=1,
        pool_factory=switchable_factory,
        warmup=False,
    )
    yield thread
    thread.stop()


def http_index(server: ServerThread) -> list[dict[str, str]]:
    port = server.server.http_port
    assert port is not None
    status, raw = fetch(port, "/v2/repository/index", b"")
    assert status == 200, raw
    doc: list[dict[str, str]] = json.loads(raw)
    return doc


def test_grpc_repository_index_lists_ready_and_unavailable_models(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.server.grpc_port}")
    index = client.get_model_repository_index(as_json=True)
    assert index["models"] == [
        {"name": "alpha", "version": "1", "state": "READY"},
        {"name": "beta", "version": "1", "state": "READY"},
    ]
    assert index["models"] == http_index(server)

    beta = server.server.repository.get("beta")
    beta.pool.down = True
    try:
        index = client.get_model_repository_index(as_json=True)
        assert index["models"] == [
            {"name": "alpha", "version": "1", "state": "READY"},
            {"name": "beta", "version": "1", "state": "UNAVAILABLE", "reason": "no healthy device"},
        ]
        assert [(m["name"], m["state"]) for m in http_index(server)] == [
            ("alpha", "READY"),
            ("beta", "UNAVAILABLE"),
        ]
        # Triton's ``ready`` flag: only the models ready now
        ready_only = client._client_stub.RepositoryIndex(
            grpcclient.service_pb2.RepositoryIndexRequest(ready=True)
        )
        assert [m.name for m in ready_only.models] == ["alpha"]
    finally:
        beta.pool.down = False
    assert client.is_server_ready()
    assert not [r for r in caplog.records if r.exc_info], "the index logged a traceback"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.get_system_shared_memory_status(), "does not support system shared memory"),
        (lambda c: c.get_cuda_shared_memory_status(), "does not support CUDA shared memory"),
        (lambda c: c.get_log_settings(), "LogSettings: this server does not support"),
    ],
    ids=["system-shm", "cuda-shm", "log-settings"],
)
def test_unsupported_grpc_methods_answer_unimplemented_in_one_line(
    server: ServerThread, caplog: pytest.LogCaptureFixture, call: Any, message: str
) -> None:
    caplog.set_level(logging.WARNING)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.server.grpc_port}")
    with pytest.raises(InferenceServerException) as error:
        call(client)
    assert error.value.status() == "StatusCode.UNIMPLEMENTED"
    assert message in error.value.message()
    assert client.is_server_ready()
    assert not [r for r in caplog.records if r.exc_info], "an unsupported method logged a traceback"
