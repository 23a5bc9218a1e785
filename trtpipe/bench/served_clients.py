"""The load generator's clients: one sentence in, its sentence embedding out, per protocol.

Request bodies are built once per sentence before timing and replies are parsed with orjson,
so a level measures the server, not the client (which shares the machine's cores with it). HTTP
clients share keep-alive connections parsed by httptools (:mod:`trtpipe.bench.http_connection`,
a third of aiohttp's cost per round trip); gRPC clients share HTTP/2 connections framed by zttp
(:mod:`trtpipe.bench.grpc_channel`, a third of tritonclient's asyncio client's CPU per request),
or tritonclient itself (what Triton users run) with ``--grpc-client tritonclient``.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from typing import Any

import numpy as np
import orjson

from trtpipe.bench.http_connection import HttpConnections
from trtpipe.errors import InputError
from trtpipe.server.protocol import encode_bytes_tensor

POOLED = "sentence_embedding"


def http_url(address: str) -> str:
    """``HOST:PORT`` (what ``--url`` takes) or a full URL -> a URL with its scheme."""
    return address if "://" in address else f"http://{address}"


class Client:
    """Sends sentence ``index`` and returns the reply's sentence embedding."""

    name = "httptools"  # what speaks the protocol, in the bench's report

    def __init__(
        self, url: str, model: str, texts: list[str], ids: list[list[int]], inputs: list[str]
    ):
        self.address = url  # as given: HOST:PORT (gRPC) or a URL
        self.url = http_url(url)
        self.model = model
        self.texts = texts
        self.ids = ids
        self.inputs = inputs  # the engine's token inputs, sent by the token-tensor protocols
        self.session: Any = None

    async def open(self) -> None:
        self.session = HttpConnections(self.url)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def embed(self, index: int) -> np.ndarray:
        raise NotImplementedError

    async def _post(
        self, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[bytes, dict[str, str]]:
        """The reply's body and headers (names lowercased); InputError unless it is a 200."""
        reply = await self.session.post(path, body, headers)
        if reply.status != 200:
            raise InputError(f"HTTP {reply.status}: {reply.body[:200]!r}")
        return reply.body, reply.headers


class OpenAIClient(Client):
    """POST /v1/embeddings, one sentence, base64 vectors: what the openai SDK sends when the
    caller gives no ``encoding_format`` (and decodes itself)."""

    encoding_format = "base64"

    async def open(self) -> None:
        await super().open()
        self.bodies = [
            json.dumps(
                {"model": self.model, "input": t, "encoding_format": self.encoding_format}
            ).encode()
            for t in self.texts
        ]

    async def embed(self, index: int) -> np.ndarray:
        payload, _ = await self._post(
            "/v1/embeddings", self.bodies[index], {"Content-Type": "application/json"}
        )
        vector = orjson.loads(payload)["data"][0]["embedding"]
        if self.encoding_format == "base64":
            return np.frombuffer(base64.b64decode(vector), dtype="<f4").copy()
        return np.asarray(vector, dtype=np.float32)


class OpenAIFloatClient(OpenAIClient):
    """As :class:`OpenAIClient` with ``encoding_format: float`` (JSON numbers)."""

    encoding_format = "float"


class V2TextClient(Client):
    """POST /v2/models/M/infer with the BYTES ``text`` input, JSON in and out."""

    async def open(self) -> None:
        await super().open()
        self.bodies = [
            json.dumps(
                {
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}],
                    "outputs": [{"name": POOLED}],
                }
            ).encode()
            for t in self.texts
        ]

    async def embed(self, index: int) -> np.ndarray:
        payload, _ = await self._post(
            f"/v2/models/{self.model}/infer",
            self.bodies[index],
            {"Content-Type": "application/json"},
        )
        output = orjson.loads(payload)["outputs"][0]
        return np.asarray(output["data"], dtype=np.float32)


class V2TokensClient(Client):
    """POST /v2/models/M/infer with INT64 token tensors in the binary extension, binary out."""

    async def open(self) -> None:
        await super().open()
        self.bodies = [binary_token_body(token_arrays(ids, self.inputs)) for ids in self.ids]

    async def embed(self, index: int) -> np.ndarray:
        body, header_length = self.bodies[index]
        payload, headers = await self._post(
            f"/v2/models/{self.model}/infer",
            body,
            {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(header_length),
            },
        )
        size = int(headers["inference-header-content-length"])
        return np.frombuffer(payload[size:], dtype="<f4").copy()


def token_arrays(ids: list[int], inputs: list[str]) -> dict[str, np.ndarray]:
    """One sentence's token tensors, exactly the engine's inputs (INT64, batch 1)."""
    n = len(ids)
    arrays = {
        "input_ids": np.asarray([ids], dtype="<i8"),
        "attention_mask": np.ones((1, n), dtype="<i8"),
        "token_type_ids": np.zeros((1, n), dtype="<i8"),
    }
    return {name: arrays[name] for name in inputs}


def binary_token_body(arrays: dict[str, np.ndarray]) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "INT64",
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": array.nbytes},
                }
                for name, array in arrays.items()
            ],
            "outputs": [{"name": POOLED, "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + b"".join(a.tobytes() for a in arrays.values()), len(header)


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


class GrpcClient(Client):
    """KServe ModelInfer with the BYTES ``text`` input or token tensors, each sentence's request
    serialized once, on the bench's own channel (:mod:`trtpipe.bench.grpc_channel`)."""

    tokens = False
    name = "zttp"

    async def open(self) -> None:
        from tritonclient.grpc import service_pb2

        from trtpipe.bench.grpc_channel import GrpcChannel

        self.messages = service_pb2
        self.channel = GrpcChannel(self.url.split("://", 1)[1])
        self.requests = [self._request(i).SerializeToString() for i in range(len(self.texts))]

    def _request(self, index: int) -> Any:
        request = self.messages.ModelInferRequest(model_name=self.model)
        for name, datatype, shape, raw in self._tensors(index):
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            request.raw_input_contents.append(raw)
        request.outputs.add(name=POOLED)
        return request

    def _tensors(self, index: int) -> list[tuple[str, str, list[int], bytes]]:
        """Each input's name, datatype, shape and raw contents (BYTES framed as the server
        reads them)."""
        if not self.tokens:
            return [("text", "BYTES", [1], encode_bytes_tensor([self.texts[index]]))]
        arrays = token_arrays(self.ids[index], self.inputs)
        return [(n, "INT64", list(a.shape), a.tobytes()) for n, a in arrays.items()]

    async def close(self) -> None:
        await self.channel.close()

    async def embed(self, index: int) -> np.ndarray:
        reply = self.messages.ModelInferResponse.FromString(
            await self.channel.unary(MODEL_INFER, self.requests[index])
        )
        for position, output in enumerate(reply.outputs):
            if output.name == POOLED:
                return np.frombuffer(reply.raw_output_contents[position], dtype="<f4")
        raise InputError(f"the reply has no {POOLED!r} output")


class GrpcTokensClient(GrpcClient):
    tokens = True


class TritonGrpcClient(Client):
    """The same calls as :class:`GrpcClient` through tritonclient.grpc.aio's ``infer`` (what
    Triton users run; the bench spends about three times the CPU per request with it)."""

    tokens = False
    name = "tritonclient"

    async def open(self) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(self.url.split("://", 1)[1])
        self.outputs = [grpcclient.InferRequestedOutput(POOLED)]
        self.requests = [self._inputs(i) for i in range(len(self.texts))]

    def _inputs(self, index: int) -> list[Any]:
        grpcclient = self.grpc
        if not self.tokens:
            text = grpcclient.InferInput("text", [1], "BYTES")
            text.set_data_from_numpy(np.array([self.texts[index].encode()], dtype=object))
            return [text]
        entries = []
        for name, value in token_arrays(self.ids[index], self.inputs).items():
            entry = grpcclient.InferInput(name, list(value.shape), "INT64")
            entry.set_data_from_numpy(value)
            entries.append(entry)
        return entries

    async def close(self) -> None:
        await self.client.close()

    async def embed(self, index: int) -> np.ndarray:
        result = await self.client.infer(self.model, self.requests[index], outputs=self.outputs)
        return np.asarray(result.as_numpy(POOLED)[0], dtype=np.float32)


class TritonGrpcTokensClient(TritonGrpcClient):
    tokens = True


GRPC_CLIENTS = ("zttp", "tritonclient")


def grpc_client_name(choice: str) -> str:
    """``auto`` -> the bench's own channel where zttp is installed (Python 3.11+), else
    tritonclient; an explicit choice is checked."""
    if choice not in ("auto", *GRPC_CLIENTS):
        raise InputError(f"unknown gRPC client {choice!r}; choose auto, {', '.join(GRPC_CLIENTS)}")
    if importlib.util.find_spec("zttp") is None:  # as the server's --grpc-server auto
        if choice == "zttp":
            raise InputError(
                "--grpc-client zttp needs zttp (Python 3.11+); use --grpc-client tritonclient"
            )
        return "tritonclient"
    return "zttp" if choice == "auto" else choice


CLIENTS: dict[str, type[Client]] = {
    "openai": OpenAIClient,
    "openai-float": OpenAIFloatClient,
    "v2-text": V2TextClient,
    "v2-tokens": V2TokensClient,
    "grpc-text": GrpcClient,
    "grpc-tokens": GrpcTokensClient,
}
TRITON_GRPC_CLIENTS: dict[str, type[Client]] = {
    "grpc-text": TritonGrpcClient,
    "grpc-tokens": TritonGrpcTokensClient,
}


def client_for(protocol: str, config: Any, ids: list[list[int]], inputs: list[str]) -> Client:
    """The client of ``protocol``; gRPC's is ``config.grpc_client`` (a name from
    :func:`grpc_client_name`)."""
    url = config.grpc_url if protocol.startswith("grpc") else config.url
    kind = CLIENTS[protocol]
    if config.grpc_client == "tritonclient":
        kind = TRITON_GRPC_CLIENTS.get(protocol, kind)
    return kind(url, config.model, config.texts, ids, inputs)
