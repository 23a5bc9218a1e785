"""Generation over KServe v2 infer with Triton's TensorRT-LLM tensors (``text_input`` ->
``text_output``), driven by tritonclient over HTTP and gRPC, streaming over ModelStreamInfer."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.decoders import save_tiny_llama

MODEL = "tiny-llama"
PROMPTS = ("The King is dead.", "Once upon a time")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from tests.server_utils import start_server
    from trtpipe.build import BuildConfig, build_engine_dir
    from trtpipe.export import export_model

    root = tmp_path_factory.mktemp("gen-v2")
    onnx_path = export_model(
        str(save_tiny_llama(root / "model")), root / "onnx", task="text-generation-with-past"
    )
    engine = root / "engine"
    build_engine_dir(BuildConfig(onnx_path=onnx_path, output=engine, backend="onnxruntime"))
    thread = start_server([f"{MODEL}={engine}"], devices=1)
    yield {
        "url": f"http://127.0.0.1:{thread.server.http_port}",
        "http": f"127.0.0.1:{thread.server.http_port}",
        "grpc": f"127.0.0.1:{thread.server.grpc_port}",
        "engine": engine,
    }
    thread.stop()


def completion(served: dict, prompt: str, max_tokens: int, **extra: Any) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    reply = httpx.post(served["url"] + "/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def tensors(module: Any, prompts: list[str], **scalars: Any) -> list[Any]:
    """text_input [rows, 1] and each scalar as a [1, 1] tensor of the TensorRT-LLM dtype."""
    text = module.InferInput("text_input", [len(prompts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[p.encode()] for p in prompts], dtype=object))
    out = [text]
    for name, value in scalars.items():
        array = np.asarray(value)
        array = array.reshape(-1, 1) if array.ndim else array.reshape(1, 1)
        if array.dtype == np.bool_:
            datatype = "BOOL"
        elif array.dtype.kind == "f":
            array, datatype = array.astype(np.float32), "FP32"
        elif name == "random_seed":
            array, datatype = array.astype(np.uint64), "UINT64"
        else:
            array, datatype = array.astype(np.int32), "INT32"
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def texts(result: Any) -> list[str]:
    return [v.decode() for v in result.as_numpy("text_output").reshape(-1)]


def test_http_infer_returns_the_greedy_completion(served: dict) -> None:
    import tritonclient.http as httpclient

    expected = completion(served, PROMPTS[0], 12)["choices"][0]["text"]
    assert expected
    with httpclient.InferenceServerClient(served["http"]) as client:
        result = client.infer(MODEL, tensors(httpclient, [PROMPTS[0]], max_tokens=12))
        assert result.as_numpy("text_output").shape == (1, 1)
        assert texts(result) == [expected]
        # Prompt echoed when asked (TensorRT-LLM's exclude_input_in_output=false).
        echoed = client.infer(
            MODEL,
            tensors(httpclient, [PROMPTS[0]], max_tokens=12, exclude_input_in_output=False),
        )
        assert texts(echoed) == [PROMPTS[0] + expected]


def test_grpc_infer_rows_are_their_own_sequences_in_order(served: dict) -> None:
    import tritonclient.grpc as grpcclient

    expected = [
        completion(served, p, n)["choices"][0]["text"] for p, n in zip(PROMPTS, (5, 9), strict=True)
    ]
    assert expected[0] != expected[1]
    with grpcclient.InferenceServerClient(served["grpc"]) as client:
        result = client.infer(MODEL, tensors(grpcclient, list(PROMPTS), max_tokens=[5, 9]))
        assert result.as_numpy("text_output").shape == (2, 1)
        assert texts(result) == expected
        # One max_tokens for both rows.
        both = client.infer(MODEL, tensors(grpcclient, list(PROMPTS), max_tokens=9))
        assert texts(both)[1] == expected[1]
        assert texts(both)[0] == completion(served, PROMPTS[0], 9)["choices"][0]["text"]


def test_seeded_sampling_matches_the_openai_route(served: dict) -> None:
    import tritonclient.grpc as grpcclient

    sampled = dict(temperature=0.9, top_k=50, seed=7)
    want = completion(served, PROMPTS[1], 12, **sampled)["choices"][0]["text"]
    greedy = completion(served, PROMPTS[1], 12)["choices"][0]["text"]
    assert want != greedy
    with grpcclient.InferenceServerClient(served["grpc"]) as client:
        inputs = tensors(
            grpcclient, [PROMPTS[1]], max_tokens=12, temperature=0.9, top_k=50, random_seed=7
        )
        assert texts(client.infer(MODEL, inputs)) == [want]
        # Temperature alone stays greedy, as in TensorRT-LLM (sampling needs top_k or top_p).
        warm = tensors(grpcclient, [PROMPTS[1]], max_tokens=12, temperature=0.9)
        assert texts(client.infer(MODEL, warm)) == [greedy]


class Collector:
    """tritonclient stream callback: (result, error) pairs on a queue."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def __call__(self, result: Any, error: Any) -> None:
        self.items.put((result, error))

    def take(self, count: int, timeout: float = 60) -> list[tuple[Any, Any]]:
        return [self.items.get(timeout=timeout) for _ in range(count)]


def final_flag(result: Any) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)


def test_grpc_stream_sends_one_response_per_token(served: dict) -> None:
    import tritonclient.grpc as grpcclient

    whole = completion(served, PROMPTS[0], 10, ignore_eos=True)
    assert whole["usage"]["completion_tokens"] == 10
    collector = Collector()
    with grpcclient.InferenceServerClient(served["grpc"]) as client:
        client.start_stream(collector)
        inputs = tensors(grpcclient, [PROMPTS[0]], max_tokens=10, ignore_eos=True, stream=True)
        client.async_stream_infer(MODEL, inputs, request_id="s1")
        got = collector.take(10)
        # Not streamed on the same stream: one response with the whole text, flagged final.
        plain = tensors(grpcclient, [PROMPTS[0]], max_tokens=10, ignore_eos=True)
        client.async_stream_infer(MODEL, plain, request_id="s2")
        (single,) = collector.take(1)
        client.stop_stream()
    assert all(error is None for _, error in got)
    assert [r.get_response().id for r, _ in got] == ["s1"] * 10
    assert [final_flag(r) for r, _ in got] == [False] * 9 + [True]
    assert "".join(texts(r)[0] for r, _ in got) == whole["choices"][0]["text"]
    assert single[1] is None and final_flag(single[0])
    assert texts(single[0]) == [whole["choices"][0]["text"]]
    assert collector.items.empty()


def test_bad_requests_are_clear_errors_and_the_server_keeps_serving(served: dict) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    good = completion(served, PROMPTS[1], 4)["choices"][0]["text"]
    with httpclient.InferenceServerClient(served["http"]) as client:
        bad = tensors(httpclient, [PROMPTS[1]], max_tokens=4, repetition_penalty=1.2)
        with pytest.raises(
            InferenceServerException, match="unknown input 'repetition_penalty'"
        ) as e:
            client.infer(MODEL, bad)
        assert e.value.status() == "400"
        with pytest.raises(InferenceServerException, match="needs gRPC ModelStreamInfer"):
            client.infer(MODEL, tensors(httpclient, [PROMPTS[1]], max_tokens=4, stream=True))
        with pytest.raises(InferenceServerException, match='needs "max_tokens"'):
            client.infer(MODEL, tensors(httpclient, [PROMPTS[1]]))
    with grpcclient.InferenceServerClient(served["grpc"]) as client:
        with pytest.raises(InferenceServerException, match="top-p must be in") as e:
            client.infer(MODEL, tensors(grpcclient, [PROMPTS[1]], max_tokens=4, top_p=2.0))
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        collector = Collector()
        client.start_stream(collector)
        words = grpcclient.InferInput("bad_words", [1, 1], "BYTES")
        words.set_data_from_numpy(np.array([[b"King"]], dtype=object))
        bad = [*tensors(grpcclient, [PROMPTS[1]], max_tokens=4, stream=True), words]
        client.async_stream_infer(MODEL, bad, request_id="bad")
        two_rows = tensors(grpcclient, list(PROMPTS), max_tokens=4, stream=True)
        client.async_stream_infer(MODEL, two_rows, request_id="rows")
        client.async_stream_infer(MODEL, tensors(grpcclient, [PROMPTS[1]], max_tokens=4))
        answers = collector.take(3)
        client.stop_stream()
    errors = sorted(str(error) for _, error in answers if error is not None)
    assert len(errors) == 2
    assert "bad_words is not supported" in errors[0]
    assert "stream=true takes one text_input row, got 2" in errors[1]
    (served_ok,) = [result for result, error in answers if error is None]
    assert texts(served_ok) == [good] and final_flag(served_ok)


def test_metadata_and_config_advertise_the_tensors(served: dict) -> None:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(served["grpc"]) as client:
        metadata = client.get_model_metadata(MODEL, as_json=True)
        config = client.get_model_config(MODEL, as_json=True)["config"]
    inputs = {t["name"]: t for t in metadata["inputs"]}
    assert inputs["text_input"] == {"name": "text_input", "datatype": "BYTES", "shape": ["-1", "1"]}
    assert {"max_tokens", "temperature", "top_k", "top_p", "random_seed", "stream"} <= set(inputs)
    assert [t["name"] for t in metadata["outputs"]] == ["text_output"]
    assert config["model_transaction_policy"] == {"decoupled": True}
    optional = {t["name"]: t.get("optional", False) for t in config["input"]}
    assert optional["text_input"] is False and optional["stream"] is True


STEP_DELAY_S = 0.02


@pytest.fixture(scope="module")
def slow(served: dict) -> Iterator[dict]:
    """A second server on the same engine: 2 rows per step, 1 waiting request, and every engine
    step 20 ms longer, so a request is surely still running when the test acts on it."""
    from tests.server_utils import start_server

    small = start_server(
        [f"{MODEL}={served['engine']}"], devices=1, max_batch_size=2, max_queue_size=1
    )
    for scheduler in small.server.repository.generators[MODEL].schedulers:
        inner = scheduler.session.step

        def step(*args: Any, _inner: Any = inner) -> Any:
            time.sleep(STEP_DELAY_S)
            return _inner(*args)

        scheduler.session.step = step
    yield {
        "url": f"http://127.0.0.1:{small.server.http_port}",
        "http": f"127.0.0.1:{small.server.http_port}",
        "grpc": f"127.0.0.1:{small.server.grpc_port}",
    }
    small.stop()


def counts_when(served: dict, done: Any) -> dict:
    """The model's generation_stats once ``done(stats)`` holds (or after 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        stats = httpx.get(served["url"] + f"/v2/models/{MODEL}/stats", timeout=10).json()
        counts = dict(stats["model_stats"][0]["generation_stats"])
        if done(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def test_a_full_queue_refuses_the_whole_request_with_503(served: dict, slow: dict) -> None:
    """Both rows of the batch running, one slot of queue: a two-row request is refused whole
    (its first row, already queued, is cancelled) and the server then serves the next one."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    before = counts_when(slow, lambda c: c["running"] == 0)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 150, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    url = slow["url"] + "/v1/completions"
    with (
        httpx.stream("POST", url, json=body, timeout=60) as hog1,
        httpx.stream("POST", url, json=body, timeout=60) as hog2,
        httpclient.InferenceServerClient(slow["http"]) as client,
    ):
        for hog in (hog1, hog2):  # both running: the batch is full, the queue empty
            assert next(hog.iter_lines()).startswith("data: ")
        with pytest.raises(InferenceServerException, match="max queue size 1") as refused:
            client.infer(MODEL, tensors(httpclient, list(PROMPTS), max_tokens=3))
        assert refused.value.status() == "503"
    counts = counts_when(slow, lambda c: c["cancelled"] >= before["cancelled"] + 3)
    # The second row was refused; the first, already queued, was cancelled with the two closed
    # streams and never ran.
    delta = {k: counts[k] - before[k] for k in ("rejected", "cancelled", "finished")}
    assert delta == {"rejected": 1, "cancelled": 3, "finished": 0}
    with httpclient.InferenceServerClient(slow["http"]) as client:
        reply = client.infer(MODEL, tensors(httpclient, [PROMPTS[1]], max_tokens=4))
    assert texts(reply) == [completion(served, PROMPTS[1], 4)["choices"][0]["text"]]


def test_a_modelinfer_past_its_deadline_cancels_its_row(slow: dict) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    before = counts_when(slow, lambda c: c["running"] == 0)
    with grpcclient.InferenceServerClient(slow["grpc"]) as client:
        inputs = tensors(grpcclient, [PROMPTS[0]], max_tokens=100, ignore_eos=True)
        with pytest.raises(InferenceServerException, match="Deadline"):
            client.infer(MODEL, inputs, client_timeout=0.5)  # 100 steps take > 2 s
    counts = counts_when(slow, lambda c: c["cancelled"] > before["cancelled"])
    assert counts["cancelled"] - before["cancelled"] == 1
    assert counts["finished"] == before["finished"] and counts["running"] == 0


def generation_series(served: dict) -> dict[str, float]:
    text = httpx.get(served["url"] + "/metrics", timeout=10).text
    return {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("trtpipe_generation") and f'model="{MODEL}"' in line
        and "_bucket" not in line
    }  # fmt: skip


def test_closing_the_stream_cancels_the_sequence(slow: dict) -> None:
    import tritonclient.grpc as grpcclient

    cancelled, generated = (
        "trtpipe_generation_requests_cancelled",
        "trtpipe_generation_generated_tokens",
    )
    counts_when(slow, lambda c: c["running"] == 0)
    before = generation_series(slow)
    collector = Collector()
    with grpcclient.InferenceServerClient(slow["grpc"]) as client:
        client.start_stream(collector)
        inputs = tensors(grpcclient, [PROMPTS[0]], max_tokens=200, ignore_eos=True, stream=True)
        client.async_stream_infer(MODEL, inputs)
        (first,) = collector.take(1)
        assert first[1] is None and not final_flag(first[0])
        client.stop_stream(cancel_requests=True)
    deadline, series = time.monotonic() + 30, before
    while time.monotonic() < deadline and series[cancelled] == before[cancelled]:
        time.sleep(0.05)
        series = generation_series(slow)
    assert series[cancelled] == before[cancelled] + 1
    assert series["trtpipe_generation_running_sequences"] == 0
    assert series[generated] - before[generated] < 200  # it never ran to its end
