"""OpenAI-compatible /v1/embeddings, checked with the ``openai`` client against the runner."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.server_utils import fetch, reference_runner, start_server, text_feeds
from trtpipe.server.app import ServerThread

TEXTS = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Serving engines should be fast.",
]


@pytest.fixture(scope="module")
def minilm_engine(minilm_serving_engine: Path) -> Path:
    return minilm_serving_engine


@pytest.fixture(scope="module")
def server(minilm_engine: Path, tiny_bert_engine: Path) -> Iterator[ServerThread]:
    thread = start_server([str(minilm_engine), f"tiny={tiny_bert_engine}"], devices=2)
    yield thread
    thread.stop()


def client(server: ServerThread):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="x", max_retries=0
    )


def test_openai_embeddings_equal_the_engine_sentence_embedding(
    server: ServerThread, minilm_engine: Path
) -> None:
    response = client(server).embeddings.create(model="minilm", input=TEXTS)
    assert response.model == "minilm"
    assert [d.index for d in response.data] == [0, 1, 2]
    runner = reference_runner(minilm_engine, workers=2)
    try:
        tokens = 0
        for text, item in zip(TEXTS, response.data, strict=True):
            feeds = text_feeds(minilm_engine, text)
            tokens += feeds["input_ids"].shape[1]
            want = runner.infer(feeds)["sentence_embedding"][0]
            got = np.asarray(item.embedding, dtype=np.float32)
            assert got.shape == (384,)
            assert np.allclose(got, want, atol=1e-5), float(np.abs(got - want).max())
            assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-4  # all-MiniLM-L6-v2 normalizes
    finally:
        runner.close()
    assert response.usage.prompt_tokens == tokens == response.usage.total_tokens
    # the real model puts the two man-sentences closer than the unrelated one
    vectors = np.array([d.embedding for d in response.data])
    sims = vectors @ vectors.T
    assert sims[0, 1] > sims[0, 2]


def test_single_string_is_bit_exact_in_float_and_base64(
    server: ServerThread, minilm_engine: Path
) -> None:
    embedding = client(server).embeddings.create(
        model="minilm", input=TEXTS[2], encoding_format="float"
    )
    status, raw = fetch(
        server.server.http_port or 0,
        "/v1/embeddings",
        json.dumps({"model": "minilm", "input": TEXTS[2], "encoding_format": "base64"}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200
    import base64

    decoded = np.frombuffer(base64.b64decode(json.loads(raw)["data"][0]["embedding"]), "<f4")
    got = np.asarray(embedding.data[0].embedding, dtype=np.float32)
    assert np.array_equal(decoded, got)
    runner = reference_runner(minilm_engine, workers=2)
    try:  # one text runs alone (no padding): bit-exact with the runner
        want = runner.infer(text_feeds(minilm_engine, TEXTS[2]))["sentence_embedding"][0]
    finally:
        runner.close()
    assert np.array_equal(got, want)


def test_mean_pooling_for_engines_without_a_pooled_output(
    server: ServerThread, tiny_bert_engine: Path
) -> None:
    response = client(server).embeddings.create(model="tiny", input=TEXTS[:2])
    runner = reference_runner(tiny_bert_engine, workers=2)
    try:
        assert len(response.data) == 2
        for text, item in zip(TEXTS[:2], response.data, strict=True):
            hidden = runner.infer(text_feeds(tiny_bert_engine, text))["last_hidden_state"][0]
            pooled = hidden.mean(axis=0)
            want = pooled / np.linalg.norm(pooled)
            assert np.allclose(item.embedding, want, atol=1e-5)
    finally:
        runner.close()


def test_embedding_errors_use_the_openai_shape(server: ServerThread) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as missing:
        client(server).embeddings.create(model="nope", input="x")
    assert "Request for unknown model: 'nope' is not found" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client(server).embeddings.create(model="minilm", input=[])
    assert "'input'" in str(bad.value)
    status, raw = fetch(server.server.http_port or 0, "/v1/embeddings", b"{oops")
    assert status == 400
    assert "malformed JSON" in json.loads(raw)["error"]["message"]
    models = client(server).models.list()
    assert sorted(m.id for m in models.data) == ["minilm", "tiny"]
