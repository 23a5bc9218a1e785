"""The serving hot path: text tokenized once per request, warm-up before ready, the null
runner, and the served real-text bench (every protocol, every reply checked)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.server_utils import fetch, start_server
from trtpipe.engine import EngineDir
from trtpipe.server.app import ServerThread

TEXTS = [
    "A man is eating food.",
    "Serving engines should be fast.",
    "¿Dónde está la biblioteca? Ünïcödé and emoji 🚀 survive tokenization.",
    "word " * 200,  # longer than the profile's 64 tokens: truncated
    "x",
]


@pytest.fixture(scope="module")
def server(minilm_serving_engine: Path) -> Iterator[ServerThread]:
    thread = start_server([f"minilm={minilm_serving_engine}"], devices=1)
    yield thread
    thread.stop()


def small_bench(server: ServerThread, engine: Path, **fields: Any) -> Any:
    """A served real-text bench config for one quick check against the module's server."""
    from trtpipe.bench.served_text import ServedTextConfig

    return ServedTextConfig(
        url=f"127.0.0.1:{server.server.http_port}",
        model="minilm",
        engine_dir=engine,
        offline_runs=1,
        threads=1,
        **fields,
    )


def offline_figures(config: Any) -> Any:
    """The bench's offline figures for ``config`` alone (the engine closed again at once)."""
    from trtpipe.bench.served_text import _offline_engine

    with _offline_engine(config) as (offline, _, _):
        return offline


def test_one_tokenizer_call_gives_what_per_text_tokenization_gives(
    minilm_serving_engine: Path,
) -> None:
    from trtpipe.server.text_input import TextEncoder
    from trtpipe.text import feeds_from_encoding, load_tokenizer

    engine = EngineDir(minilm_serving_engine)
    encoder = TextEncoder(engine.path, engine.manifest.inputs, max_length=64)
    rows = encoder.encode(TEXTS, truncate=True)
    tokenizer = load_tokenizer(str(engine.path))
    for text, row in zip(TEXTS, rows, strict=True):
        # What the server did before: one tokenizer call per text, mapped to the engine inputs.
        alone = feeds_from_encoding(
            tokenizer([text], truncation=True, max_length=64), engine.manifest.inputs
        )
        assert sorted(row) == sorted(alone) == sorted(s.name for s in engine.manifest.inputs)
        for name, array in alone.items():
            assert row[name].dtype == array.dtype
            np.testing.assert_array_equal(row[name], array)
    assert rows[3]["input_ids"].shape == (1, 64)
    with pytest.raises(Exception, match=r"text 0 is 20[0-9] tokens; the model accepts at most 64"):
        encoder.encode([TEXTS[3]], truncate=False)
    with pytest.raises(Exception, match="not valid Unicode"):
        encoder.encode(["ok", "bad \ud800"], truncate=True)


def test_served_text_equals_per_request_direct_runs(
    server: ServerThread, minilm_serving_engine: Path
) -> None:
    """Batch-1 requests batched by the server return what each text alone gives offline."""
    import asyncio

    import openai

    from tests.server_utils import reference_runner, text_feeds

    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="x", max_retries=0
    )

    async def all_at_once() -> list[list[float]]:
        replies = await asyncio.gather(
            *(client.embeddings.create(model="minilm", input=t) for t in TEXTS[:3] * 4)
        )
        return [r.data[0].embedding for r in replies]

    vectors = asyncio.run(all_at_once())
    runner = reference_runner(minilm_serving_engine, workers=1)
    try:
        for text, vector in zip(TEXTS[:3] * 4, vectors, strict=True):
            direct = runner.infer(text_feeds(minilm_serving_engine, text))["sentence_embedding"]
            np.testing.assert_allclose(vector, direct[0], atol=1e-5)
    finally:
        runner.close()


def test_warmup_runs_every_bucket_before_ready(minilm_serving_engine: Path) -> None:
    from trtpipe.devices import Device
    from trtpipe.runners.onnxruntime import OnnxRuntimeRunner
    from trtpipe.runtime.warmup import warming_factory, warmup_shapes

    manifest = EngineDir(minilm_serving_engine).manifest
    shapes = warmup_shapes(manifest)
    # Profile 1..8 x 1..64: batch 1 and 8 at every power-of-two bucket up to 64.
    buckets = [1, 2, 4, 8, 16, 32, 64]
    assert shapes == [(1, s) for s in buckets] + [(8, s) for s in buckets]
    seen: list[tuple[int, ...]] = []

    class Recording(OnnxRuntimeRunner):
        def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            seen.append(feeds["input_ids"].shape)
            return super()._infer(feeds)

        def warm_every_session(self, feeds: dict[str, np.ndarray]) -> None:
            seen.append(feeds["input_ids"].shape)  # warm-up runs each of the runner's sessions
            super().warm_every_session(feeds)

    make = warming_factory(
        lambda device: Recording(EngineDir(minilm_serving_engine), device), manifest, None
    )
    runner = make(Device("cpu", 0))
    assert seen == []
    runner.load()
    assert seen == shapes
    runner.close()
    assert warmup_shapes(manifest, max_batch_size=4)[-1] == (4, 64)


def test_null_runner_answers_with_zeros_of_the_engine_signature(
    minilm_serving_engine: Path,
) -> None:
    import tritonclient.http as httpclient

    thread = start_server([f"null={minilm_serving_engine}"], devices=1, null_runner=True)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{thread.server.http_port}")
        ids = np.array([[101, 2023, 2003, 102]], dtype=np.int64)
        inputs = []
        for name, value in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
            entry = httpclient.InferInput(name, list(value.shape), "INT64")
            entry.set_data_from_numpy(value)
            inputs.append(entry)
        result = client.infer("null", inputs)
        tokens = result.as_numpy("token_embeddings")
        pooled = result.as_numpy("sentence_embedding")
        assert tokens.shape == (1, 4, 384) and tokens.dtype == np.float32
        assert pooled.shape == (1, 384) and not pooled.any()
        status, _ = fetch(thread.server.http_port, "/v2/models/null/ready")
        assert status == 200
    finally:
        thread.stop()


def test_served_text_bench_checks_every_reply_on_every_protocol(
    server: ServerThread, minilm_serving_engine: Path
) -> None:
    from trtpipe.bench.served_text import (
        PROTOCOLS,
        ServedTextConfig,
        run_served_text,
        served_text_table,
    )

    port, grpc_port = server.server.http_port, server.server.grpc_port
    texts = [t for t in TEXTS if len(t) < 100] * 3
    result = run_served_text(
        ServedTextConfig(
            url=f"127.0.0.1:{port}",
            grpc_url=f"127.0.0.1:{grpc_port}",
            model="minilm",
            texts=texts,
            engine_dir=minilm_serving_engine,
            concurrency=[1, 4],
            protocols=list(PROTOCOLS),
            max_requests=24,
            duration_s=30,
            c1_runs=3,
            c1_direct_texts=12,
            c1_block=5,
            offline_runs=1,
            threads=1,
        )
    )
    data = result["served_text"]
    assert [p["protocol"] for p in data["protocols"]] == [
        "openai",
        "openai-float",
        "v2-text",
        "v2-tokens",
        "grpc-text",
        "grpc-tokens",
    ]
    grpc_client = "zttp" if importlib.util.find_spec("zttp") else "tritonclient"  # auto
    assert [p["client"] for p in data["protocols"]] == ["httptools"] * 4 + [grpc_client] * 2
    assert data["offline"]["sorted_sentences_per_s"] > 0
    # The sorted figure is measured at the start and again after each protocol; each
    # protocol's levels are shares of the mean of the two around them.
    checkpoints = data["offline"]["sorted_sentences_per_s_checkpoints"]
    assert len(checkpoints) == 1 + len(PROTOCOLS) and all(c > 0 for c in checkpoints)
    assert checkpoints[0] == data["offline"]["sorted_sentences_per_s"]
    for i, proto in enumerate(data["protocols"]):
        assert proto["offline_sorted_before_after"] == checkpoints[i : i + 2]
        reference = sum(checkpoints[i : i + 2]) / 2
        for level in proto["levels"]:
            assert level["of_offline_sorted"] == pytest.approx(level["requests_per_s"] / reference)
            assert level["of_offline_sorted_at_start"] == pytest.approx(
                level["requests_per_s"] / checkpoints[0]
            )
    assert set(data["offline"]["arrival_sentences_per_s"]) == {1, 4}
    for proto in data["protocols"]:
        for level in proto["levels"]:
            assert level["requests"] == 24, (proto["protocol"], level)
            assert level["wrong_replies"] == 0 and level["errors"] == 0
            # The server runs in this process here, so the share counts its CPU too.
            assert level["client_cpu_share"] > 0
            # The same CPU seconds, per answered request: share x cores x elapsed / requests.
            assert level["client_cpu_us_per_request"] == pytest.approx(
                level["client_cpu_share"] * (os.cpu_count() or 1) * 1e6 / level["requests_per_s"]
            )
            assert level["of_offline_sorted"] > 0
            server_side = level["server"]
            assert server_side["workers"] == 1  # the fixture serves on one device
            assert 0 < server_side["engine_busy_share"] <= 1.0
            assert server_side["engine_ms_per_request"] > 0 and server_side["queue_ms"] >= 0
            # From /metrics: the event loop's CPU is part of the process's (which here also
            # holds this test's client and the engine).
            loop_us = server_side["loop_cpu_us_per_request"]
            assert 0 < loop_us < server_side["server_cpu_us_per_request"]
        c1 = proto["levels"][0]
        assert len(c1["overhead_p50_ms_runs"]) == 3
        assert c1["overhead_p50_ms"] == sorted(c1["overhead_p50_ms_runs"])[1]
        # Each run alternates blocks of served requests with direct batch-1 calls on the same
        # sentences (threads=1 here): 12 sentences in blocks of 5, 5 and 2.
        assert c1["direct_threads"] == 1 and all(d > 0 for d in c1["direct_p50_ms_runs"])
        assert c1["overhead_requests"] == 3 * 12 and c1["direct_block"] == 5
        assert c1["overhead_p50_ms_runs"] == pytest.approx(
            [p - d for p, d in zip(c1["p50_ms_runs"], c1["direct_p50_ms_runs"], strict=True)]
        )
    table = served_text_table(data)
    assert "grpc-tokens" in table and "c1 p50 overhead" in table
    assert f"v2-tokens httptools, grpc-text {grpc_client}, grpc-tokens {grpc_client}" in table
    assert table.count("this client's CPU") == len(data["protocols"])
    assert "mean over the model's" in table and "loop us/req" in table
    assert "engine ms/req" in table and "ms per sentence on 1 thread(s)" in table
    assert data["offline"]["sorted_ms_per_sentence"] == pytest.approx(
        1000.0 / data["offline"]["sorted_sentences_per_s"]
    )


@pytest.mark.parametrize("protocol", ["grpc-text", "grpc-tokens"])
def test_the_benchs_grpc_channel_gets_what_tritonclient_gets(
    server: ServerThread, minilm_serving_engine: Path, protocol: str
) -> None:
    """The bench's own gRPC client (prebuilt requests on zttp's HTTP/2) and tritonclient's
    asyncio client send the same request and read the same reply, to the bit."""
    pytest.importorskip("zttp", reason="the bench's gRPC channel needs zttp (Python 3.11+)")
    from types import SimpleNamespace

    from trtpipe.bench.served_clients import client_for
    from trtpipe.text import load_tokenizer

    texts = TEXTS[:3]
    engine = EngineDir(minilm_serving_engine)
    tokenizer = load_tokenizer(str(engine.path))
    ids = tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    inputs = [spec.name for spec in engine.manifest.inputs]

    async def vectors(kind: str) -> tuple[str, list[np.ndarray]]:
        config = SimpleNamespace(
            url="",
            grpc_url=f"127.0.0.1:{server.server.grpc_port}",
            model="minilm",
            texts=texts,
            grpc_client=kind,
        )
        client = client_for(protocol, config, ids, inputs)
        await client.open()
        try:
            return client.name, [await client.embed(i) for i in range(len(texts))]
        finally:
            await client.close()

    own_name, own = asyncio.run(vectors("zttp"))
    triton_name, triton = asyncio.run(vectors("tritonclient"))
    assert (own_name, triton_name) == ("zttp", "tritonclient")
    for mine, theirs in zip(own, triton, strict=True):
        assert mine.shape == theirs.shape == (384,) and mine.dtype == theirs.dtype
        np.testing.assert_array_equal(mine, theirs)
    assert not np.array_equal(own[0], own[1])  # each sentence its own vector


def test_wrong_replies_are_counted(server: ServerThread, minilm_serving_engine: Path) -> None:
    """The reply check can fail: replies compared with another sentence's vectors are wrong."""
    import asyncio

    from trtpipe.bench import served_text
    from trtpipe.bench.served_text import _protocol

    config = small_bench(
        server, minilm_serving_engine, texts=TEXTS[:3], concurrency=[1], max_requests=6, c1_runs=1
    )
    offline = offline_figures(config)
    offline.vectors = np.roll(offline.vectors, 1, axis=0)  # every reference now another text's
    result = asyncio.run(_protocol("openai", config, offline))
    assert result["levels"][0]["wrong_replies"] == 6
    assert served_text.agreement_floor("int8") < served_text.agreement_floor("fp32")


@pytest.mark.parametrize("grpc_client", ["zttp", "tritonclient"])
def test_a_grpc_port_nobody_answers_on_is_one_clear_error(
    server: ServerThread, minilm_serving_engine: Path, grpc_client: str
) -> None:
    """The first requests of a level fail as an InputError naming the address, not a
    traceback out of the client."""
    if grpc_client == "zttp":
        pytest.importorskip("zttp", reason="the bench's gRPC channel needs zttp (Python 3.11+)")
    from trtpipe.bench.served_text import _protocol
    from trtpipe.errors import InputError

    config = small_bench(
        server,
        minilm_serving_engine,
        grpc_url="127.0.0.1:1",  # nothing listens on port 1
        grpc_client=grpc_client,
        texts=TEXTS[:2],
        concurrency=[4],
        max_requests=4,
    )
    offline = offline_figures(config)
    with pytest.raises(InputError, match=r"the first requests to 127.0.0.1:1 failed: "):
        asyncio.run(_protocol("grpc-tokens", config, offline))


def test_c1_pairing_uses_one_server_workers_threads(server: ServerThread) -> None:
    """The stats document says each CPU worker's intra-op threads; the bench's direct batch-1
    calls of a c1 overhead run read them there."""
    import asyncio

    from trtpipe.bench.served_text import lone_launch_threads
    from trtpipe.bench.server_readings import server_stats
    from trtpipe.devices import cpu_cores

    stats = asyncio.run(server_stats(f"127.0.0.1:{server.server.http_port}", "minilm"))
    # One CPU worker (devices=1) gets all of the machine's cores.
    assert [d["threads"] for d in stats["devices"]] == [cpu_cores()]
    assert lone_launch_threads(stats) == cpu_cores()
    assert lone_launch_threads({"devices": [{"device": "cuda:0", "threads": None}]}) is None


def test_c1_direct_calls_run_on_the_offline_engine_when_its_threads_match(
    server: ServerThread, minilm_serving_engine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's offline engine already has the server's lone-launch threads, so the c1
    overhead's direct calls run on it: a large engine is not loaded a second time per protocol.
    Where its threads differ, a copy with the server's threads is loaded, as before."""
    from trtpipe.bench import served_text
    from trtpipe.bench.served_text import _offline_engine, _protocol

    loads: list[int] = []
    real = served_text.direct_batch1

    def counting(engine_dir: Path, ids: list[list[int]], pad_id: int, threads: int) -> Any:
        loads.append(threads)
        return real(engine_dir, ids, pad_id, threads)

    monkeypatch.setattr(served_text, "direct_batch1", counting)
    config = small_bench(
        server,
        minilm_serving_engine,
        texts=TEXTS[:4],
        concurrency=[1],
        max_requests=4,
        c1_runs=2,
        c1_direct_texts=4,
        c1_block=2,
    )
    with _offline_engine(config) as (offline, _, batch1_seconds):
        shared = asyncio.run(_protocol("openai", config, offline, batch1_seconds))
        assert loads == []
        offline.threads = 2  # as if the offline runs had used two threads
        copied = asyncio.run(_protocol("openai", config, offline, batch1_seconds))
        assert loads == [1]  # the server's lone-launch threads (config.threads here)
    for result in (shared, copied):
        c1 = result["levels"][0]
        assert c1["direct_threads"] == 1 and len(c1["direct_p50_ms_runs"]) == 2
        assert all(d > 0 for d in c1["direct_p50_ms_runs"])
        assert c1["wrong_replies"] == 0 and c1["errors"] == 0
