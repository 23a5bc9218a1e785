"""Every endpoint treats its input as hostile: 4xx with one clear line, never a 500 or a traceback.

Hand-picked cases (lone surrogates, deep nesting, wrong-typed fields, enormous shapes, header
lengths outside the body, bad encodings) assert the status and the message; a property-based
test (hypothesis) throws generated JSON documents and binary bodies at the HTTP endpoints. The
request documents are also self-describing: ``/openapi.json`` shows their schemas and statuses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_utils import fetch, start_server
from trtpipe.server.app import ServerThread

MODEL = "tiny"
INFER = f"/v2/models/{MODEL}/infer"
NAMES = ("input_ids", "attention_mask", "token_type_ids")


class TracebackCatcher(logging.Handler):
    """Collects every log record that carries a traceback, from any logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            self.records.append(record)


@pytest.fixture(scope="module")
def server(tiny_bert_engine: Path) -> Iterator[ServerThread]:
    thread = start_server([f"{MODEL}={tiny_bert_engine}"], devices=1, max_body_bytes=1 << 20)
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def tracebacks() -> Iterator[TracebackCatcher]:
    catcher = TracebackCatcher()
    root = logging.getLogger()
    root.addHandler(catcher)
    yield catcher
    root.removeHandler(catcher)


def port(server: ServerThread) -> int:
    value = server.server.http_port
    assert value is not None
    return value


def good_infer() -> bytes:
    values = {"input_ids": [101, 2000, 102], "attention_mask": [1, 1, 1], "token_type_ids": [0] * 3}
    tensors = [
        {"name": n, "datatype": "INT64", "shape": [1, 3], "data": v} for n, v in values.items()
    ]
    return json.dumps({"inputs": tensors}).encode()


def assert_still_serving(server: ServerThread) -> None:
    status, raw = fetch(port(server), INFER, good_infer())
    assert status == 200, raw
    assert json.loads(raw)["outputs"][0]["shape"] == [1, 3, 32]


def binary_request(tensors: list[dict[str, Any]], payload: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": tensors}).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header))}


def text_request(value: str, datatype: str = "BYTES", **extra: Any) -> bytes:
    tensor = {"name": "text", "datatype": datatype, "shape": [1], "data": [value]}
    return json.dumps({"inputs": [tensor], **extra}).encode()


HUGE_SHAPE = [{"name": "input_ids", "datatype": "INT64", "shape": [10**12], "data": [1]}]
HUGE_BINARY = [
    {
        "name": "input_ids",
        "datatype": "INT64",
        "shape": [10**12],
        "parameters": {"binary_data_size": 8},
    }
]
HUGE_BYTES = [
    {
        "name": "text",
        "datatype": "BYTES",
        "shape": [10**12, 10**12],
        "parameters": {"binary_data_size": 0},
    }
]

# case -> (path, body, headers, status, message in the error)
HOSTILE: dict[str, tuple[str, bytes, dict[str, str], int, str]] = {
    # JSON escapes for a lone surrogate: not text, so not JSON any program can decode
    "v2 lone surrogate": (INFER, text_request("\ud800"), {}, 400, "malformed JSON"),
    "v2 lone low surrogate": (INFER, text_request("a\udc00b"), {}, 400, "malformed JSON"),
    "embeddings lone surrogate": (
        "/v1/embeddings",
        b'{"model": "tiny", "input": ["ok", "\\ud800"]}',
        {},
        400,
        "malformed JSON",
    ),
    "v2 deep nesting": (INFER, b"[" * 100_000 + b"]" * 100_000, {}, 400, "malformed JSON"),
    "v2 deep data": (
        INFER,
        b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1], "data": '
        + b"[" * 5000
        + b"]" * 5000
        + b"}]}",
        {},
        400,
        "malformed JSON",
    ),
    "embeddings deep nesting": ("/v1/embeddings", b'{"input": ' + b"[" * 50_000, {}, 400, "JSON"),
    "v2 not an object": (INFER, b"[1, 2]", {}, 400, "infer request must be a JSON object"),
    "v2 no inputs": (INFER, b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
    "v2 id not a string": (INFER, b'{"id": 5, "inputs": [1]}', {}, 400, "id must be a string"),
    "v2 shape of strings": (
        INFER,
        b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": ["1"], "data": [1]}]}',
        {},
        400,
        "inputs[0].shape[0] must be an integer",
    ),
    "v2 truncation not a boolean": (
        INFER,
        text_request("hello", parameters={"truncation": "no"}),
        {},
        400,
        "parameters.truncation must be true or false",
    ),
    "v2 binary_data_output not a boolean": (
        INFER,
        text_request("hello", parameters={"binary_data_output": "yes"}),
        {},
        400,
        "parameters.binary_data_output must be true or false",
    ),
    "v2 binary_data_size a string": (
        INFER,
        b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1],'
        b' "parameters": {"binary_data_size": "8"}}]}',
        {},
        400,
        "inputs[0].parameters.binary_data_size must be an integer",
    ),
    "v2 output without a name": (
        INFER,
        b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}],'
        b' "outputs": [{"parameters": {}}]}',
        {},
        400,
        "outputs[0].name is required",
    ),
    "v2 text sent as INT64": (
        INFER,
        b'{"inputs": [{"name": "text", "datatype": "INT64", "shape": [1], "data": [1]}]}',
        {},
        400,
        "text is sent as BYTES",
    ),
    "v2 enormous shape, JSON": (
        INFER,
        json.dumps({"inputs": HUGE_SHAPE}).encode(),
        {},
        400,
        "needs 1000000000000 elements",
    ),
    "v2 enormous shape, binary": (
        INFER,
        *binary_request(HUGE_BINARY, b"\0" * 8),
        400,
        "needs 8000000000000 bytes, got 8",
    ),
    "v2 enormous BYTES shape": (
        INFER,
        *binary_request(HUGE_BYTES, b""),
        400,
        "BYTES data ends before element 0",
    ),
    "v2 huge integer": (
        INFER,
        b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1], "data": ['
        + b"9" * 5000
        + b"]}]}",
        {},
        400,
        "malformed JSON",
    ),
    "header length negative": (
        INFER,
        good_infer(),
        {"Inference-Header-Content-Length": "-1"},
        400,
        "Inference-Header-Content-Length -1 is outside the body",
    ),
    "header length past the body": (
        INFER,
        good_infer(),
        {"Inference-Header-Content-Length": "100000"},
        400,
        "is outside the body",
    ),
    "header length not a number": (
        INFER,
        good_infer(),
        {"Inference-Header-Content-Length": "ten"},
        400,
        "Inference-Header-Content-Length 'ten' is not an integer",
    ),
    "header length of 5000 digits": (
        INFER,
        good_infer(),
        {"Inference-Header-Content-Length": "9" * 5000},
        400,
        "is not an integer",
    ),
    "unknown Content-Encoding": (
        INFER,
        good_infer(),
        {"Content-Encoding": "br"},
        400,
        "unsupported Content-Encoding 'br'; use gzip or deflate",
    ),
    "gzip that is not gzip": (
        INFER,
        good_infer(),
        {"Content-Encoding": "gzip"},
        400,
        "body is not valid gzip data",
    ),
    "embeddings wrong-typed model": (
        "/v1/embeddings",
        b'{"model": ["tiny"], "input": "a"}',
        {},
        400,
        "embeddings request: model must be a string",
    ),
    "embeddings wrong encoding_format": (
        "/v1/embeddings",
        b'{"model": "tiny", "input": "a", "encoding_format": []}',
        {},
        400,
        "encoding_format must be one of 'float' or 'base64'",
    ),
    "embeddings token ids": (
        "/v1/embeddings",
        b'{"model": "tiny", "input": [[1, 2]]}',
        {},
        400,
        "token-id input is not supported",
    ),
    "embeddings without input": ("/v1/embeddings", b'{"model": "tiny"}', {}, 400, "'input' is"),
    "embeddings of an unknown model": (
        "/v1/embeddings",
        b'{"model": "nope", "input": "a"}',
        {},
        404,
        "Request for unknown model: 'nope' is not found",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_requests_get_one_clear_4xx(
    server: ServerThread, tracebacks: TracebackCatcher, case: str
) -> None:
    path, body, headers, want_status, message = HOSTILE[case]
    status, raw = fetch(port(server), path, body, headers)
    assert status == want_status, raw[:300]
    error = json.loads(raw)["error"]
    text = error["message"] if path.startswith("/v1/") else error
    assert message in text, text
    assert "Traceback" not in text and "\n" not in text
    assert_still_serving(server)
    assert not tracebacks.records, tracebacks.records


def test_openapi_describes_request_bodies_and_error_statuses(server: ServerThread) -> None:
    status, raw = fetch(port(server), "/openapi.json")
    assert status == 200
    doc = json.loads(raw)
    schemas = doc["components"]["schemas"]
    infer = schemas["InferRequest"]
    assert infer["required"] == ["inputs"]
    assert infer["properties"]["inputs"]["minItems"] == 1
    tensor = schemas["InferInputTensor"]
    assert set(tensor["required"]) == {"name", "datatype", "shape"}
    assert "FP32" in tensor["properties"]["datatype"]["enum"]
    assert tensor["properties"]["shape"]["maxItems"] == 8
    assert tensor["properties"]["shape"]["items"]["minimum"] == 0
    embeddings = schemas["EmbeddingsRequest"]
    assert embeddings["required"] == ["input"]
    assert embeddings["properties"]["encoding_format"]["anyOf"][0]["enum"] == ["float", "base64"]

    route = doc["paths"]["/v2/models/{name}/infer"]["post"]
    body_schema = route["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/InferRequest"}
    assert {"400", "404", "500", "503", "504"} <= set(route["responses"])
    assert route["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    route = doc["paths"]["/v1/embeddings"]["post"]
    assert route["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EmbeddingsRequest"
    }
    assert route["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIErrorResponse"
    }
    # no interactive docs: they would load their assets from a CDN
    assert fetch(port(server), "/docs")[0] == 404


# -- property-based: generated documents and bodies -------------------------------------------
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
DATATYPES = st.sampled_from(["INT64", "INT32", "FP32", "BYTES", "BOOL", "FP16", "UINT8", "X"])
NAME = st.sampled_from([*NAMES, "text", "", "nope"])
SHAPE = st.lists(st.integers(min_value=-2, max_value=70) | st.just(10**12), max_size=3)
TENSOR = st.fixed_dictionaries(
    {"name": NAME, "datatype": DATATYPES, "shape": SHAPE},
    optional={
        "data": JSON_VALUES | st.lists(st.integers(-5, 40000), max_size=8),
        "parameters": st.fixed_dictionaries(
            {},
            optional={
                "binary_data_size": st.integers(-1, 64) | JSON_SCALARS,
                "binary_data": JSON_SCALARS,
            },
        ),
    },
)
INFER_DOCUMENT = st.fixed_dictionaries(
    {"inputs": st.lists(TENSOR, max_size=3) | JSON_VALUES},
    optional={
        "id": JSON_SCALARS,
        "outputs": st.lists(st.fixed_dictionaries({"name": NAME | JSON_SCALARS}), max_size=2),
        "parameters": st.dictionaries(
            st.sampled_from(["truncation", "binary_data_output", "other"]), JSON_SCALARS
        ),
    },
)
EMBEDDINGS_DOCUMENT = st.fixed_dictionaries(
    {},
    optional={
        "input": JSON_VALUES | st.lists(st.text(max_size=20), max_size=3),
        "model": st.sampled_from([MODEL, "nope"]) | JSON_SCALARS,
        "encoding_format": st.sampled_from(["float", "base64", "hex"]) | JSON_SCALARS,
        "dimensions": JSON_SCALARS,
    },
)


def json_body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


HOSTILE_BODY = st.one_of(
    st.tuples(st.just(INFER), INFER_DOCUMENT.map(json_body), st.just({})),
    st.tuples(st.just(INFER), JSON_VALUES.map(json_body), st.just({})),
    st.tuples(
        st.just(INFER),
        st.tuples(INFER_DOCUMENT.map(json_body), st.binary(max_size=64)),
        st.integers(-2, 400) | st.text("0123456789-+ .xe", max_size=6),
    ).map(lambda t: (t[0], t[1][0] + t[1][1], {"Inference-Header-Content-Length": str(t[2])})),
    st.tuples(st.just(INFER), st.binary(max_size=200), st.just({})),
    st.tuples(st.just("/v1/embeddings"), EMBEDDINGS_DOCUMENT.map(json_body), st.just({})),
    st.tuples(st.just("/v1/embeddings"), st.binary(max_size=200), st.just({})),
    st.tuples(
        st.sampled_from(["/v2/repository/index", "/v2/models/tiny/versions/1/infer"]),
        st.binary(max_size=100),
        st.fixed_dictionaries({}, optional={"Content-Encoding": st.sampled_from(["gzip", "x"])}),
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same bodies on every run: a failure reproduces
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=HOSTILE_BODY)
def test_generated_bodies_never_get_a_5xx(
    server: ServerThread, tracebacks: TracebackCatcher, case: tuple[str, bytes, dict[str, str]]
) -> None:
    path, body, headers = case
    status, raw = fetch(port(server), path, body, headers)
    assert status < 500, (status, raw[:300], body[:300], headers)
    if status >= 400:
        assert "error" in json.loads(raw)
    assert not tracebacks.records, tracebacks.records


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    name=st.text(min_size=1, max_size=20), what=st.sampled_from(["config", "ready", "stats", ""])
)
def test_generated_model_paths_never_get_a_5xx(
    server: ServerThread, tracebacks: TracebackCatcher, name: str, what: str
) -> None:
    from urllib.parse import quote

    path = f"/v2/models/{quote(name, safe='')}" + (f"/{what}" if what else "")
    status, raw = fetch(port(server), path)
    assert status in (200, 404, 503) if name == MODEL else status == 404, (status, raw[:200])
    assert not tracebacks.records, tracebacks.records


def test_the_server_still_answers_after_the_fuzzing(server: ServerThread) -> None:
    assert_still_serving(server)
    status, raw = fetch(port(server), "/v2/health/ready")
    assert status == 200 and json.loads(raw)["ready"] is True
