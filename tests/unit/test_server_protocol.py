"""KServe v2 codec: JSON and binary tensors, BYTES framing, every size a client can lie about."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from trtpipe.server.protocol import (
    ProtocolError,
    RequestedOutput,
    decode_bytes_tensor,
    encode_bytes_tensor,
    encode_http_response,
    parse_http_request,
    select_outputs,
    v2_datatype,
)


def binary_request(
    inputs: list[tuple[str, str, list[int], bytes]], **extra: object
) -> tuple[bytes, int]:
    header = {
        "inputs": [
            {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(raw)}}
            for n, d, s, raw in inputs
        ],
        **extra,
    }
    encoded = json.dumps(header).encode()
    return encoded + b"".join(raw for *_, raw in inputs), len(encoded)


def test_json_tensors_keep_datatype_shape_and_values() -> None:
    body = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {
                    "name": "ids",
                    "datatype": "INT64",
                    "shape": [2, 3],
                    "data": [[1, 2, 3], [4, 5, 6]],
                },
                {"name": "x", "datatype": "FP16", "shape": [2], "data": [0.5, -1.25]},
                {"name": "flag", "datatype": "BOOL", "shape": [1], "data": [True]},
                {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["héllo", ""]},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
            "parameters": {"binary_data_output": False},
        }
    ).encode()
    request = parse_http_request(body)
    ids, x, flag, text = request.inputs
    assert request.id == "r1"
    assert ids.data.dtype == np.int64 and ids.data.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert x.data.dtype == np.float16 and x.data.tolist() == [0.5, -1.25]
    assert flag.data.dtype == np.bool_ and flag.data.tolist() == [True]
    assert text.data.tolist() == ["héllo".encode(), b""]
    assert request.outputs == [RequestedOutput("y", True)]
    assert request.binary_default is False


def test_binary_tensors_round_trip_exactly() -> None:
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    values = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    strings = encode_bytes_tensor([b"a", "bé", b""])
    body, length = binary_request(
        [
            ("ids", "INT64", [3, 4], ids.tobytes()),
            ("v", "FP32", [2, 3], values.tobytes()),
            ("s", "BYTES", [3], strings),
        ]
    )
    request = parse_http_request(body, str(length))
    assert np.array_equal(request.inputs[0].data, ids)
    assert np.array_equal(request.inputs[1].data, values)
    assert request.inputs[2].data.tolist() == [b"a", "bé".encode(), b""]


def test_bytes_framing_is_little_endian_length_prefixed() -> None:
    raw = encode_bytes_tensor([b"ab", b"xyz"])
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 3) + b"xyz"
    assert decode_bytes_tensor(raw, 2, "s").tolist() == [b"ab", b"xyz"]


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (struct.pack("<I", 10) + b"abc", 1, "claims 10 bytes but only 3 remain"),
        (struct.pack("<I", 1) + b"a", 2, "ends before element 1 of 2"),
        (struct.pack("<I", 1) + b"ab", 1, "1 bytes left over"),
    ],
)
def test_bytes_lengths_that_lie_are_rejected(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_bytes_tensor(raw, count, "s")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b, n: (b, str(n + 1000)), "outside the body"),
        (lambda b, n: (b, "abc"), "not an integer"),
        (lambda b, n: (b[:-4], str(n)), "runs past the end of the body"),
        (lambda b, n: (b + b"\0" * 8, str(n)), "8 bytes of binary data after the inputs"),
        (lambda b, n: (b[: n - 1], str(n - 1)), "malformed JSON"),
    ],
)
def test_binary_sizes_that_lie_are_rejected(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    body, length = binary_request(
        [("ids", "INT64", [1, 4], np.arange(4, dtype=np.int64).tobytes())]
    )
    bad_body, header = mutate(body, length)
    with pytest.raises(ProtocolError, match=message):
        parse_http_request(bad_body, header)


def test_binary_size_must_match_shape() -> None:
    body, length = binary_request(
        [("ids", "INT64", [2, 4], np.arange(4, dtype=np.int64).tobytes())]
    )
    with pytest.raises(ProtocolError, match=r"shape \[2, 4\] INT64 needs 64 bytes, got 32"):
        parse_http_request(body, str(length))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"name": "a", "datatype": "INT64", "shape": [3], "data": [1, 2]}, "needs 3 elements"),
        ({"name": "a", "datatype": "INT64", "shape": [2], "data": [1, 2.5]}, "must be integers"),
        ({"name": "a", "datatype": "INT8", "shape": [1], "data": [300]}, "do not fit INT8"),
        ({"name": "a", "datatype": "FP32", "shape": [1], "data": ["x"]}, "must be numbers"),
        ({"name": "a", "datatype": "BOOL", "shape": [1], "data": [1]}, "true/false"),
        ({"name": "a", "datatype": "BYTES", "shape": [1], "data": [1]}, "JSON strings"),
        ({"name": "a", "datatype": "FP8", "shape": [1], "data": [1]}, "unsupported datatype"),
        ({"name": "a", "datatype": "FP32", "shape": [-1], "data": [1]}, "non-negative"),
        ({"name": "a", "datatype": "FP32", "shape": [1]}, "neither 'data' nor binary_data_size"),
        (
            {
                "name": "a",
                "datatype": "FP32",
                "shape": [1],
                "data": [1],
                "parameters": {"shared_memory_region": "r"},
            },
            "shared memory is not supported",
        ),
    ],
)
def test_bad_json_tensors_name_the_problem(tensor: dict, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_http_request(json.dumps({"inputs": [tensor]}).encode())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "non-empty 'inputs'"),
        (b'{"inputs": [1]}', r"inputs\[0\] must be an object"),
        (
            b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]},'
            b' {"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            "given twice",
        ),
    ],
)
def test_malformed_requests_are_rejected(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_http_request(body)


def test_response_mixes_json_and_binary_outputs() -> None:
    produced = {
        "logits": np.array([[0.5, -2.0]], dtype=np.float32),
        "hidden": np.arange(6, dtype=np.float16).reshape(1, 2, 3),
        "labels": np.array([b"pos"], dtype=object),
    }
    chosen = select_outputs(
        produced,
        [
            RequestedOutput("logits", False),
            RequestedOutput("hidden"),
            RequestedOutput("labels", True),
        ],
        True,
    )
    body, length = encode_http_response("m", "1", "req", chosen)
    assert length is not None
    header = json.loads(body[:length])
    assert header["id"] == "req" and header["model_name"] == "m"
    logits, hidden, labels = header["outputs"]
    assert labels["datatype"] == "BYTES" and labels["parameters"]["binary_data_size"] == 7
    assert logits == {"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [0.5, -2.0]}
    assert hidden["datatype"] == "FP16" and hidden["parameters"]["binary_data_size"] == 12
    raw = body[length:]
    assert np.array_equal(
        np.frombuffer(raw[:12], dtype=np.float16).reshape(1, 2, 3), produced["hidden"]
    )
    assert decode_bytes_tensor(raw[12:], 1, "labels").tolist() == [b"pos"]


def test_all_json_response_has_no_header_length() -> None:
    chosen = select_outputs({"y": np.array([True, False])}, None, False)
    body, length = encode_http_response("m", "1", "", chosen)
    assert length is None
    assert json.loads(body)["outputs"][0] == {
        "name": "y",
        "datatype": "BOOL",
        "shape": [2],
        "data": [True, False],
    }


def test_json_numbers_read_back_exactly_in_their_datatype() -> None:
    """JSON outputs are written by orjson from the array (float32 in its shortest float32
    form, not widened to a double's digits): read back as the datatype, every value is the
    same, and the body is shorter than a list of Python floats would make it."""
    rng = np.random.default_rng(0)
    produced = {
        "embedding": rng.standard_normal((2, 384)).astype(np.float32),
        "half": rng.standard_normal((3,)).astype(np.float16),
        "ids": np.array([[-(2**62), 7], [0, 2**62]], dtype=np.int64),
        "mask": np.array([[True], [False]]),
        "strided": np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],  # not contiguous
        "special": np.array([np.nan, np.inf, -0.0], dtype=np.float32),
    }
    body, length = encode_http_response("m", "1", "", select_outputs(produced, None, False))
    assert length is None
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    for name in ("embedding", "half", "ids", "mask", "strided"):
        array = produced[name]
        read = np.asarray(outputs[name]["data"], dtype=array.dtype).reshape(outputs[name]["shape"])
        assert read.dtype == array.dtype and np.array_equal(read, array), name
    assert outputs["special"]["data"] == [None, None, -0.0]  # JSON has no NaN or Infinity
    as_python_floats = json.dumps(produced["embedding"].ravel().tolist())
    embedding_text = json.dumps(outputs["embedding"]["data"])
    assert len(body) < len(as_python_floats)
    assert len(embedding_text) < 0.7 * len(as_python_floats)


def test_unknown_requested_output_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="unknown output 'nope'"):
        select_outputs({"y": np.zeros(1)}, [RequestedOutput("nope")], False)


def test_datatype_names() -> None:
    assert [v2_datatype(t) for t in ("float32", "float16", "int64", "int32", "bool")] == [
        "FP32",
        "FP16",
        "INT64",
        "INT32",
        "BOOL",
    ]
    assert v2_datatype(np.array(["a"], dtype=object).dtype) == "BYTES"
