"""Text-generation engines under Triton's explicit model control, through tritonclient (HTTP and
gRPC) and the ``openai`` client: load makes the model ready on every surface; unload while
streams run drains it as SIGTERM does (running sequences stream to their end, queued and new
requests get 503, then its schedulers and sessions are freed); load again works."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.decoders import save_tiny_llama
from trtpipe.devices import Device
from trtpipe.server.app import InferenceServer, ServerConfig, ServerThread
from trtpipe.server.config import ServeConfig
from trtpipe.server.repository import ModelRepository

MODEL = "llm"
PROMPTS = ["Once upon a time", "The King is dead. Long live", "A B C D E"]
MAX_TOKENS = 12


class Gate:
    """Holds a generation model's decode steps in place, on any machine speed (no sleeps).

    ``admit`` (when cleared) holds the first step of the next request, so a second request
    queues behind it and both join one batch; ``open`` (when cleared) holds every decode step
    of a batch of ``rows`` rows or more, so those sequences stay running.
    """

    def __init__(self, rows: int = 2):
        self.rows = rows
        self.open, self.admit = threading.Event(), threading.Event()
        self.open.set()
        self.admit.set()
        self.at_admit, self.held = threading.Event(), threading.Event()

    def enter(self, input_ids: np.ndarray) -> None:
        if not self.admit.is_set():
            self.at_admit.set()
            assert self.admit.wait(60), "the test never released the first step"
        decode = input_ids.shape[1] == 1
        if decode and input_ids.shape[0] >= self.rows and not self.open.is_set():
            self.held.set()
            assert self.open.wait(60), "the test never opened the gate"


GATE = Gate()


class GatedSession:
    """A real decoder session whose steps pass through ``GATE`` first."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, input_ids: np.ndarray, *rest: Any) -> Any:
        GATE.enter(input_ids)
        return self.inner.step(input_ids, *rest)


@pytest.fixture(scope="module")
def repository_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """repo/llm: a tiny random Llama built for ONNX Runtime (the one build of this module)."""
    from trtpipe.build import BuildConfig, build_engine_dir
    from trtpipe.export import export_model

    root = tmp_path_factory.mktemp("gen-control")
    model = save_tiny_llama(root / "model")
    onnx_path = export_model(str(model), root / "onnx", task="text-generation-with-past")
    build_engine_dir(
        BuildConfig(onnx_path=onnx_path, output=root / "repo" / MODEL, backend="onnxruntime")
    )
    return root / "repo"


@pytest.fixture(scope="module")
def server(repository_dir: Path) -> Iterator[ServerThread]:
    """Explicit mode, nothing loaded at startup; every generation model it loads runs its
    steps through GATE (open unless a test closes it)."""
    from trtpipe.generation.generator import Generator
    from trtpipe.server.generation_model import ServedGeneration

    def gated_load(
        name: str, engine: Any, devices: Any = None, config: Any = None, threads: Any = None
    ) -> ServedGeneration:
        generator = Generator(engine, devices, threads)
        generator.sessions = [GatedSession(s) for s in generator.sessions]  # type: ignore[misc]
        return ServedGeneration(generator, config, name)

    # One CPU device, at most 2 running rows: the third request of a full batch queues.
    config = ServeConfig(devices=[Device("cpu", 0)], warmup=False, max_batch_size=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ServedGeneration, "load", staticmethod(gated_load))
        repository = ModelRepository.from_specs(
            [str(repository_dir)], config, control_mode="explicit"
        )
        thread = ServerThread(
            InferenceServer(repository, ServerConfig(http_port=0, grpc_port=0, drain_timeout_s=10))
        ).start()
        yield thread
        thread.stop()


def clients(server: ServerThread) -> tuple[httpclient.InferenceServerClient, Any]:
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.server.grpc_port}")
    return http, grpc


def url(server: ServerThread) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


def openai_client(server: ServerThread) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url(server) + "/v1", api_key="unused", max_retries=0)


def completion_body(prompt: str, **extra: Any) -> dict[str, Any]:
    """Greedy, exactly MAX_TOKENS tokens (EOS ignored), so a cut-short stream shows."""
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def complete(server: ServerThread, prompt: str) -> httpx.Response:
    return httpx.post(url(server) + "/v1/completions", json=completion_body(prompt), timeout=60)


def stream(server: ServerThread, prompt: str) -> tuple[str, list[str | None], int]:
    """A streamed completion through the openai client: text, finish reasons, usage tokens."""
    chunks = list(
        openai_client(server).completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    return text, finishes, chunks[-1].usage.completion_tokens


def v2_generate(client: Any, prompt: str) -> str:
    """Triton's way: v2 infer with ``text_input`` / ``max_tokens`` (HTTP or gRPC client)."""
    module = grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient
    text = module.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
    limit = module.InferInput("max_tokens", [1, 1], "INT32")
    limit.set_data_from_numpy(np.array([[MAX_TOKENS]], dtype=np.int32))
    out = client.infer(MODEL, [text, limit]).as_numpy("text_output")
    return str(out.reshape(-1)[0].decode())


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    """Poll a state the server reaches on its own (never a sleep standing in for an event)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def scheduler_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("generate@")]


def states(http: httpclient.InferenceServerClient) -> dict[str, str]:
    return {m["name"]: m["state"] for m in http.get_model_repository_index()}


def test_load_makes_a_generation_model_ready_everywhere(server: ServerThread) -> None:
    http, grpc = clients(server)
    assert http.get_model_repository_index() == [
        {"name": MODEL, "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    ]
    assert not http.is_model_ready(MODEL) and not grpc.is_model_ready(MODEL)
    assert http.is_server_ready()  # explicit mode: ready with nothing loaded, as Triton is

    http.load_model(MODEL)
    assert http.is_model_ready(MODEL) and grpc.is_model_ready(MODEL)
    assert http.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY"}]
    assert grpc.get_model_repository_index(as_json=True)["models"] == [
        {"name": MODEL, "version": "1", "state": "READY"}
    ]
    assert [m.id for m in openai_client(server).models.list()] == [MODEL]
    assert grpc.get_model_metadata(MODEL, as_json=True)["inputs"][0]["name"] == "text_input"
    reply = openai_client(server).completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
    )
    assert reply.usage.prompt_tokens > 0 and 1 <= reply.usage.completion_tokens <= MAX_TOKENS
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.choices[0].text
    # Triton's way too (v2 infer with text_input; greedy unless sampling is asked for).
    assert v2_generate(grpc, PROMPTS[0]) == v2_generate(http, PROMPTS[0]) == reply.choices[0].text

    grpc.unload_model(MODEL)
    assert not http.is_model_ready(MODEL) and not grpc.is_model_ready(MODEL)
    assert states(http) == {MODEL: "UNAVAILABLE"}
    assert scheduler_threads() == []
    assert openai_client(server).models.list().data == []
    gone = complete(server, PROMPTS[0])
    assert gone.status_code == 404
    assert "'llm' is not found; it is in the repository but not loaded (load it: POST " in gone.text
    grpc.unload_model(MODEL)  # unloading an unloaded model is not an error (Triton)


def test_unload_of_an_unknown_model_uses_tritons_wording(server: ServerThread) -> None:
    http, grpc = clients(server)
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope'"):
        http.unload_model("nope")
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope'") as e:
        grpc.unload_model("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_unload_drains_running_streams_and_refuses_the_rest(server: ServerThread) -> None:
    """Two streams running (held mid-generation) and one request queued when the unload
    starts: the streams get all their tokens, the queued and any new request get 503, the
    unload returns after the streams, and the model's threads and sessions are gone."""
    http, grpc = clients(server)
    grpc.load_model(MODEL)
    served = server.server.repository.generators[MODEL]
    scheduler = served.schedulers[0]
    # What each prompt gives when nothing is held (greedy, fp32: batch-invariant).
    reference = [complete(server, p).json()["choices"][0]["text"] for p in PROMPTS[:2]]

    GATE.open.clear()
    GATE.admit.clear()
    GATE.at_admit.clear()
    GATE.held.clear()
    futures: dict[str, Future[Any]] = {}
    try:
        with ThreadPoolExecutor(6) as pool:
            futures["a"] = pool.submit(stream, server, PROMPTS[0])
            assert GATE.at_admit.wait(30), "the first stream never reached the engine"
            futures["b"] = pool.submit(stream, server, PROMPTS[1])
            wait_for(lambda: scheduler.waiting == 1, "the second stream queued")
            GATE.admit.set()  # both join one batch, whose decode steps then wait at the gate
            assert GATE.held.wait(30), "the two streams never ran together"
            assert scheduler.running == 2
            futures["queued"] = pool.submit(complete, server, PROMPTS[2])
            wait_for(lambda: scheduler.waiting == 1, "the third request queued")

            futures["unload"] = pool.submit(
                lambda: httpclient.InferenceServerClient(
                    f"127.0.0.1:{server.server.http_port}"
                ).unload_model(MODEL)
            )
            wait_for(lambda: states(http)[MODEL] == "UNLOADING", "the index says UNLOADING")
            queued = futures["queued"].result(timeout=30)  # refused by the drain
            assert queued.status_code == 503 and "shutting down" in queued.text

            # Being unloaded: not ready, new requests refused with the reason, server ready.
            assert not http.is_model_ready(MODEL) and not grpc.is_model_ready(MODEL)
            assert grpc.get_model_repository_index(as_json=True)["models"][0]["state"] == (
                "UNLOADING"
            )
            assert http.is_server_ready() and grpc.is_server_ready()
            fresh = complete(server, PROMPTS[0])
            assert fresh.status_code == 503
            assert fresh.json()["error"]["message"] == (
                "model 'llm' is being unloaded; it takes no new requests"
            )
            streamed = httpx.post(
                url(server) + "/v1/completions",
                json=completion_body(PROMPTS[0], stream=True),
                timeout=30,
            )
            assert streamed.status_code == 503 and "being unloaded" in streamed.text
            for client, status in ((grpc, "StatusCode.UNAVAILABLE"), (http, "503")):
                with pytest.raises(InferenceServerException, match="being unloaded") as refused:
                    v2_generate(client, PROMPTS[0])
                assert refused.value.status() == status
            assert scheduler.running == 2 and not futures["unload"].done()

            GATE.open.set()
            futures["unload"].result(timeout=60)
            results = [futures[k].result(timeout=60) for k in ("a", "b")]
    finally:
        GATE.admit.set()
        GATE.open.set()

    for (text, finishes, tokens), expected in zip(results, reference, strict=True):
        assert tokens == MAX_TOKENS  # every token, none cut by the unload
        assert finishes[-1] == "length" and text == expected
    assert states(http) == {MODEL: "UNAVAILABLE"}
    assert MODEL not in server.server.repository.generators
    assert served.closed and served.generator.sessions == [] and scheduler_threads() == []
    assert served.stats()["finished"] == 4  # the two reference completions and the two streams

    http.load_model(MODEL)  # and it loads again, fresh
    assert http.is_model_ready(MODEL) and grpc.is_model_ready(MODEL)
    assert complete(server, PROMPTS[0]).json()["choices"][0]["text"] == reference[0]
    http.unload_model(MODEL)
    assert scheduler_threads() == []


def test_reload_swaps_in_a_fresh_engine_without_a_gap(server: ServerThread) -> None:
    http, _ = clients(server)
    http.load_model(MODEL)
    first = server.server.repository.generators[MODEL]
    before = complete(server, PROMPTS[1])
    http.load_model(MODEL)  # a reload: the new one is ready before the old one drains
    second = server.server.repository.generators[MODEL]
    assert second is not first and first.closed and second.ready
    after = complete(server, PROMPTS[1])
    assert before.status_code == after.status_code == 200
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
    assert len(scheduler_threads()) == 1
    http.unload_model(MODEL)
