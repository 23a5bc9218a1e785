"""Generation endpoints on a real loopback server, driven by the ``openai`` client and httpx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.decoders import save_tiny_llama

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def served(tiny_bert_engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The real ``trtpipe serve`` stack serving a decoder beside an encoder engine."""
    from tests.server_utils import start_server
    from trtpipe.build import BuildConfig, build_engine_dir
    from trtpipe.export import export_model
    from trtpipe.generation import Generator

    root = tmp_path_factory.mktemp("gen-http")
    onnx_path = export_model(
        str(save_tiny_llama(root / "model")), root / "onnx", task="text-generation-with-past"
    )
    engine = root / "engine"
    build_engine_dir(BuildConfig(onnx_path=onnx_path, output=engine, backend="onnxruntime"))
    thread = start_server([f"{MODEL}={engine}", f"encoder={tiny_bert_engine}"], devices=2)
    port = thread.server.http_port
    reference = Generator(engine)
    yield {
        "url": f"http://127.0.0.1:{port}",
        "grpc_port": thread.server.grpc_port,
        "reference": reference,
    }
    thread.stop()
    reference.close()


def client(served: dict):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)


def test_openai_completion_matches_the_generator(served: dict) -> None:
    from trtpipe.generation import SamplingParams

    reply = client(served).completions.create(
        model=MODEL, prompt="The King is dead.", max_tokens=12, temperature=0, extra_body={}
    )
    expected = served["reference"].generate(["The King is dead."], SamplingParams(12, greedy=True))
    assert reply.choices[0].text == expected[0].text
    assert reply.choices[0].finish_reason == expected[0].finish_reason
    assert reply.usage.completion_tokens == len(expected[0].token_ids)
    assert reply.usage.prompt_tokens == expected[0].prompt_tokens


def test_openai_streaming_concurrent_each_gets_its_own_tokens(served: dict) -> None:
    """Eight concurrent streams on two workers, each with its own prompt and seed."""
    from trtpipe.generation import SamplingParams

    prompts = [f"Once upon a time {i}" for i in range(8)]

    def stream(i: int) -> tuple[str, str | None]:
        pieces, finish = [], None
        for event in client(served).completions.create(
            model=MODEL,
            prompt=prompts[i],
            max_tokens=10,
            temperature=0.8,
            top_p=0.9,
            seed=100 + i,
            stream=True,
        ):
            pieces.append(event.choices[0].text)
            finish = event.choices[0].finish_reason or finish
        return "".join(pieces), finish

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(stream, range(8)))
    for i, (text, finish) in enumerate(got):
        params = SamplingParams(10, temperature=0.8, top_p=0.9, seed=100 + i)
        expected = served["reference"].generate([prompts[i]], params)[0]
        assert text == expected.text, i
        assert finish == expected.finish_reason
    assert len({text for text, _ in got}) > 1


def test_triton_generate_and_stream(served: dict) -> None:
    import httpx

    from trtpipe.generation import SamplingParams

    body = {"text_input": "A quick brown fox", "parameters": {"max_tokens": 8, "greedy": True}}
    expected = served["reference"].generate([body["text_input"]], SamplingParams(8, greedy=True))
    reply = httpx.post(f"{served['url']}/v2/models/{MODEL}/generate", json=body, timeout=30)
    assert reply.status_code == 200
    assert reply.json()["text_output"] == expected[0].text
    assert reply.json()["token_ids"] == expected[0].token_ids
    with httpx.stream(
        "POST", f"{served['url']}/v2/models/{MODEL}/generate_stream", json=body, timeout=30
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [
            json.loads(line[len("data: ") :])
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]
    assert [e["token_id"] for e in events] == expected[0].token_ids
    assert "".join(e["text_output"] for e in events) == expected[0].text
    assert events[-1]["finish_reason"] == expected[0].finish_reason


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, "top-p"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, "total length"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "max_tokens": 5000, "stream": True},
            "total length",
        ),
        (f"/v2/models/{MODEL}/generate", {"parameters": {}}, "text_input"),
        (
            f"/v2/models/{MODEL}/generate_stream",
            {"text_input": "x", "parameters": {"top_k": -2}},
            "top-k",
        ),
    ],
)
def test_bad_requests_get_400_with_the_reason(
    served: dict, path: str, body: dict, message: str
) -> None:
    import httpx

    reply = httpx.post(served["url"] + path, json=body, timeout=30)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert message in (error["message"] if isinstance(error, dict) else error)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, "unknown generation model 'nope'"),
        ("/v2/models/nope/generate", {"text_input": "x"}, "unknown generation model 'nope'"),
        (
            "/v1/completions",
            {"model": "encoder", "prompt": "x"},
            "model 'encoder' is not a text-generation engine: use POST /v2/models/encoder/infer",
        ),
        (
            "/v2/models/encoder/generate_stream",
            {"text_input": "x"},
            "model 'encoder' is not a text-generation engine",
        ),
    ],
)
def test_a_model_that_cannot_generate_gets_404_with_the_reason(
    served: dict, path: str, body: dict, message: str
) -> None:
    """Unknown, or an encoder: 404, as a v2 infer or embeddings request naming a generation
    model gets (and as OpenAI answers an unknown model), with what to use instead."""
    import httpx

    reply = httpx.post(served["url"] + path, json=body, timeout=30)
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert message in (error["message"] if isinstance(error, dict) else error)
    # The server keeps serving.
    done = client(served).completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert done.choices[0].finish_reason in ("length", "stop")


def test_openai_sdk_raises_not_found_for_an_encoder(served: dict) -> None:
    import openai

    with pytest.raises(openai.NotFoundError, match="not a text-generation engine"):
        client(served).completions.create(model="encoder", prompt="x")


def test_grpc_statistics_include_generation_models(served: dict) -> None:
    """As HTTP's /v2/models/stats: a generation model by name, and among all models."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    client(served).completions.create(model=MODEL, prompt="x", max_tokens=3)
    address = served["url"].split("://", 1)[1]
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{served['grpc_port']}")
    http = httpclient.InferenceServerClient(address)
    try:
        one = grpc.get_inference_statistics(MODEL, as_json=True)["model_stats"]
        http_one = http.get_inference_statistics(MODEL)["model_stats"]
        assert [s["name"] for s in one] == [MODEL] == [s["name"] for s in http_one]
        assert int(one[0]["inference_count"]) == http_one[0]["inference_count"] >= 1
        every = grpc.get_inference_statistics(as_json=True)["model_stats"]
        assert sorted(s["name"] for s in every) == ["encoder", MODEL]
    finally:
        grpc.close()
        http.close()


def test_openai_client_raises_on_bad_parameters(served: dict) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="top-p must be in"):
        client(served).completions.create(model=MODEL, prompt="x", top_p=2.0)


def test_serve_lists_generation_and_encoder_models_and_is_ready(served: dict) -> None:
    models = httpx.get(served["url"] + "/v1/models", timeout=10).json()
    assert sorted(m["id"] for m in models["data"]) == ["encoder", MODEL]
    for name in ("encoder", MODEL):  # /v1/models/{id} answers for every kind of model
        assert httpx.get(served["url"] + f"/v1/models/{name}", timeout=10).json()["id"] == name
    assert httpx.get(served["url"] + "/v2/health/ready", timeout=10).status_code == 200


def test_a_missing_generation_route_on_a_generation_server_gets_the_plain_404(
    served: dict,
) -> None:
    """The "serves no text-generation model" hint is for servers without one, not this one."""
    path = f"/v2/models/{MODEL}/versions/1/generate"
    reply = httpx.post(served["url"] + path, json={"text_input": "hi"}, timeout=10)
    assert reply.status_code == 404
    assert reply.json() == {"error": f"Not Found: POST {path}"}
