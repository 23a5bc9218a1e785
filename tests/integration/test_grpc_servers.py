"""Both gRPC servers (uvicorn's HTTP/2 with trtpipe's ASGI gRPC app, and grpc.aio's own) answer
tritonclient's calls alike: results, streams, compression, deadlines and errors."""

from __future__ import annotations

import asyncio
import importlib.util
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
from tritonclient.utils import InferenceServerException

from tests.server_utils import fetch, random_feeds, scripted_pool, start_server
from trtpipe.server.app import ServerThread

MODEL = "tiny"
NAMES = ("input_ids", "attention_mask", "token_type_ids")
DELAY_S = 0.05  # every launch sleeps this long, so that a shorter deadline always expires


@pytest.fixture(scope="module", params=["uvicorn", "grpcio"])
def server(request: pytest.FixtureRequest, tiny_bert_engine: Path) -> Iterator[ServerThread]:
    if request.param == "uvicorn" and importlib.util.find_spec("zttp") is None:
        pytest.skip("uvicorn's HTTP/2 parser zttp is not installed (Python 3.10)")
    thread = start_server(
        [f"{MODEL}={tiny_bert_engine}"],
        devices=2,
        max_body_bytes=1 << 20,
        grpc_server=request.param,
        pool_factory=scripted_pool(delay_s=DELAY_S),
    )
    yield thread
    thread.stop()


@pytest.fixture
def runner(tiny_bert_reference: Any) -> Any:
    return tiny_bert_reference


@pytest.fixture
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.server.grpc_port}") as c:
        yield c


def inputs(feeds: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    items = []
    for name in NAMES:
        item = grpcclient.InferInput(name, list(feeds[name].shape), "INT64")
        item.set_data_from_numpy(feeds[name])
        items.append(item)
    return items


def test_the_configured_server_answers(server: ServerThread, client: Any) -> None:
    kind = type(server.server._grpc).__name__
    assert kind in ("UvicornGrpcServer", "Server")  # grpc.aio's class is grpc.aio._server.Server
    assert client.is_server_live() and client.is_model_ready(MODEL)
    assert client.get_model_metadata(MODEL, as_json=True)["name"] == MODEL


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_infer_is_bit_exact(client: Any, runner: Any, compression: str | None) -> None:
    feeds = random_feeds(np.random.default_rng(5), batch=2, length=9)
    result = client.infer(MODEL, inputs(feeds), request_id="q1", compression_algorithm=compression)
    assert np.array_equal(
        result.as_numpy("last_hidden_state"), runner.infer(feeds)["last_hidden_state"]
    )
    assert result.get_response().id == "q1"


def test_a_reply_over_the_http2_window_arrives_whole(client: Any, runner: Any) -> None:
    """8 x 64 x 32 floats: 65,536 bytes, past HTTP/2's initial 65,535-byte window, so the reply
    must wait for the client's window updates."""
    feeds = random_feeds(np.random.default_rng(9), batch=8, length=64)
    got = client.infer(MODEL, inputs(feeds)).as_numpy("last_hidden_state")
    assert got.nbytes == 65_536
    assert np.array_equal(got, runner.infer(feeds)["last_hidden_state"])


def test_a_stream_answers_each_request(client: Any, runner: Any) -> None:
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = {}
    for i, length in enumerate((5, 12, 7)):
        feeds = random_feeds(np.random.default_rng(10 + i), batch=1, length=length)
        sent[f"s{i}"] = runner.infer(feeds)["last_hidden_state"]
        client.async_stream_infer(MODEL, inputs(feeds), request_id=f"s{i}")
    bad = random_feeds(np.random.default_rng(20), batch=1, length=70)  # over the profile
    client.async_stream_infer(MODEL, inputs(bad), request_id="bad")
    got, errors = {}, []
    for _ in range(4):
        result, error = answers.get(timeout=30)
        if error is not None:
            errors.append(str(error))
        else:
            got[result.get_response().id] = result.as_numpy("last_hidden_state")
    client.stop_stream()
    assert sorted(got) == sorted(sent)
    for key, want in sent.items():
        assert np.array_equal(got[key], want)
    assert len(errors) == 1 and "sequence length 70" in errors[0]


def test_a_passed_deadline_is_deadline_exceeded(client: Any) -> None:
    feeds = random_feeds(np.random.default_rng(6), batch=1, length=6)
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, inputs(feeds), client_timeout=DELAY_S / 5)
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert client.infer(MODEL, inputs(feeds)).as_numpy("last_hidden_state").shape == (1, 6, 32)


def test_errors_carry_the_same_status_and_message(client: Any) -> None:
    feeds = random_feeds(np.random.default_rng(7), batch=1, length=70)
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, inputs(feeds))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "sequence length 70" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.get_model_metadata("nope")
    assert error.value.status() == "StatusCode.NOT_FOUND"
    assert "'nope'" in error.value.message()
    with pytest.raises(InferenceServerException) as error:
        client.get_log_settings()
    assert error.value.status() == "StatusCode.UNIMPLEMENTED"


def test_big_and_oversized_messages_leave_the_channel_working(client: Any, runner: Any) -> None:
    """A message just under the limit is read whole (and refused for its length); one over it
    is refused unread. Either way the connection's flow-control window must not leak, so the
    same channel keeps serving after several of each."""
    for _ in range(3):
        under = grpcclient.InferInput("input_ids", [1, 120_000], "INT64")  # 960 kB < 1 MiB
        under.set_data_from_numpy(np.ones((1, 120_000), dtype=np.int64))
        with pytest.raises(InferenceServerException) as error:
            client.infer(MODEL, [under])
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        over = grpcclient.InferInput("input_ids", [1, 200_000], "INT64")  # 1.6 MB > 1 MiB
        over.set_data_from_numpy(np.ones((1, 200_000), dtype=np.int64))
        with pytest.raises(InferenceServerException) as error:
            client.infer(MODEL, [over])
        assert error.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    feeds = random_feeds(np.random.default_rng(8), batch=1, length=4)
    got = client.infer(MODEL, inputs(feeds)).as_numpy("last_hidden_state")
    assert np.array_equal(got, runner.infer(feeds)["last_hidden_state"])


def test_http1_on_the_grpc_port_gets_a_clear_refusal(server: ServerThread) -> None:
    if type(server.server._grpc).__name__ != "UvicornGrpcServer":
        pytest.skip("grpc.aio answers HTTP/1.1 with its own connection error")
    port = server.server.grpc_port
    assert port is not None
    status, body = fetch(port, "/inference.GRPCInferenceService/ServerLive", b"")
    assert status == 400 and b"gRPC" in body


def test_one_channel_outlives_thousands_of_calls(server: ServerThread) -> None:
    """A Triton client keeps one channel open. 5,000 calls, 32 at a time, are more streams
    than zttp lets one HTTP/2 connection open (4,096): every call must still succeed."""
    url = f"127.0.0.1:{server.server.grpc_port}"

    async def calls() -> list[bool]:
        async with grpc_aio.InferenceServerClient(url) as client:

            async def worker(n: int) -> list[bool]:
                return [await client.is_server_live() for _ in range(n)]

            answers = await asyncio.gather(*(worker(5000 // 32 + 1) for _ in range(32)))
        return [live for batch in answers for live in batch]

    answers = asyncio.run(calls())
    assert len(answers) == 32 * (5000 // 32 + 1) and all(answers)


def test_one_channel_outlives_hundreds_of_cancelled_calls(
    server: ServerThread, runner: Any
) -> None:
    """Each call a client abandons resets its stream; zttp ends a connection after 256 resets.
    300 abandoned calls, with live calls running beside them on the same channel: the live
    calls must all succeed, and the channel must serve afterwards."""
    url = f"127.0.0.1:{server.server.grpc_port}"
    feeds = random_feeds(np.random.default_rng(11), batch=1, length=5)

    async def calls() -> tuple[int, list[bool], Any]:
        async with grpc_aio.InferenceServerClient(url) as client:
            abandoned = 0

            async def abandon(n: int) -> None:
                nonlocal abandoned
                for _ in range(n):
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(client.infer(MODEL, inputs(feeds)), DELAY_S / 5)
                    abandoned += 1

            async def live(done: asyncio.Future[Any]) -> list[bool]:
                answers = []
                while not done.done():
                    answers.append(await client.is_server_live())
                return answers

            abandoning = asyncio.gather(*(abandon(10) for _ in range(30)))
            lives = await asyncio.gather(*(live(abandoning) for _ in range(4)))
            await abandoning
            after = await client.infer(MODEL, inputs(feeds))
        return abandoned, [a for answers in lives for a in answers], after

    abandoned, lives, after = asyncio.run(calls())
    assert abandoned == 300
    assert lives and all(lives)
    want = runner.infer(feeds)["last_hidden_state"]
    assert np.array_equal(after.as_numpy("last_hidden_state"), want)
