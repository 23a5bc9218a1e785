"""The gRPC row of scripts/frontend_ceiling.py: the body h2load sends is a well-formed
ModelInfer that the server's own decoder reads back as the sentence's token tensors, and the
counters that stand in for gRPC status (h2load cannot see trailers) are read per model."""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.scripts import run_script

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def ceiling():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(SCRIPTS))
    try:
        import frontend_ceiling

        yield frontend_ceiling
    finally:
        sys.path.remove(str(SCRIPTS))


def test_grpc_body_is_a_framed_model_infer_of_one_sentence(
    ceiling, tiny_bert_engine: Path, tmp_path: Path
) -> None:
    from tritonclient.grpc import service_pb2

    from trtpipe.engine import EngineDir
    from trtpipe.server.grpc_codec import decode_request
    from trtpipe.text import load_tokenizer

    frame = ceiling.write_grpc_body(tmp_path, tiny_bert_engine, "m").read_bytes()
    assert frame[0] == 0  # not compressed
    (length,) = struct.unpack(">I", frame[1:5])
    assert length == len(frame) - 5
    request = service_pb2.ModelInferRequest.FromString(frame[5:])
    assert request.model_name == "m"
    assert [o.name for o in request.outputs] == ["sentence_embedding"]

    decoded = decode_request(request)
    tokenizer = load_tokenizer(str(tiny_bert_engine))
    ids = sorted(tokenizer(ceiling.SENTENCES)["input_ids"], key=len)[len(ceiling.SENTENCES) // 2]
    names = [s.name for s in EngineDir(tiny_bert_engine).manifest.inputs]
    assert [t.name for t in decoded.inputs] == names
    by_name = {t.name: t for t in decoded.inputs}
    assert by_name["input_ids"].datatype == "INT64"
    np.testing.assert_array_equal(by_name["input_ids"].data, np.asarray([ids]))
    np.testing.assert_array_equal(by_name["attention_mask"].data, np.ones((1, len(ids))))


def test_grpc_text_body_sends_that_sentence_as_the_bytes_text_input(
    ceiling, tiny_bert_engine: Path, tmp_path: Path
) -> None:
    from tritonclient.grpc import service_pb2

    from trtpipe.server.grpc_codec import decode_request
    from trtpipe.server.text_input import decode_texts

    path = ceiling.write_grpc_body(tmp_path, tiny_bert_engine, "m", protocol="grpc-text")
    assert path.name == "grpc_text.bin"
    frame = path.read_bytes()
    (length,) = struct.unpack(">I", frame[1:5])
    assert frame[0] == 0 and length == len(frame) - 5
    request = service_pb2.ModelInferRequest.FromString(frame[5:])
    decoded = decode_request(request)
    assert [(t.name, t.datatype, t.shape) for t in decoded.inputs] == [("text", "BYTES", [1])]
    sentence = ceiling.SENTENCES[ceiling.grpc_sentence(tiny_bert_engine, ceiling.SENTENCES)]
    assert decode_texts(decoded.inputs[0].data) == [sentence]
    assert [o.name for o in request.outputs] == ["sentence_embedding"]


def test_counters_are_read_for_the_named_model_only(ceiling) -> None:  # type: ignore[no-untyped-def]
    text = "\n".join(
        [
            "# TYPE nv_inference_request_success counter",
            'nv_inference_request_success{model="m2",version="1"} 7.0',
            'nv_inference_request_success{model="m",version="1"} 36299.0',
            "# TYPE nv_inference_request_failure counter",
            'nv_inference_request_failure{model="m",version="1"} 3.0',
            'nv_inference_request_failure{model="m2",version="1"} 1.0',
        ]
    )
    assert ceiling.parse_request_counters(text, "m") == (36299.0, 3.0)
    assert ceiling.parse_request_counters(text, "m2") == (7.0, 1.0)
    assert ceiling.parse_request_counters(text, "absent") == (0.0, 0.0)


def test_a_directory_without_an_engine_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    """Checked before the load generators and the server, so it needs neither wrk nor h2load."""
    done = run_script("frontend_ceiling.py", tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "no manifest.json" in done.stderr
    assert "Traceback" not in done.stderr


def test_h2load_stays_below_the_calls_a_grpc_connection_serves(ceiling) -> None:  # type: ignore[no-untyped-def]
    """h2load does not follow the server's GOAWAY to a new connection, so a run that would pass
    a connection's budget is refused before it starts (no h2load needed)."""
    most = 2 * ceiling.H2LOAD_CALLS_PER_CONNECTION
    with pytest.raises(SystemExit, match="raise --connections"):
        ceiling.h2load("127.0.0.1:1", Path("body"), 2, most + 1, 0)


def test_the_grpc_p50_is_the_median_of_h2load_request_log(ceiling) -> None:  # type: ignore[no-untyped-def]
    """h2load prints only a mean; its --log-file rows (start us, status, us to the reply's end)
    give the median that the HTTP rows take from wrk."""
    log = "1733390000000000\t200\t510\n1733390000000600\t200\t430\n1733390000001100\t200\t2900\n"
    assert ceiling.h2load_p50_ms(log) == pytest.approx(0.51)
    assert ceiling.h2load_p50_ms(log + "1733390000004100\t200\t470\n") == pytest.approx(0.49)
    assert np.isnan(ceiling.h2load_p50_ms(""))


def test_an_unknown_protocol_is_named_before_anything_runs(  # type: ignore[no-untyped-def]
    ceiling, tiny_bert_engine: Path
) -> None:
    reason = ceiling.cannot_run_reason(tiny_bert_engine, ["openai", "v2-json"])
    assert reason.startswith("unknown protocol(s) ['v2-json']; choose from openai, ")
    assert "grpc-tokens" in reason


def test_the_compiled_c1_script_refuses_an_unknown_protocol(tiny_bert_engine: Path) -> None:
    done = run_script(
        "compiled_c1_overhead.py", tiny_bert_engine, "--protocols", "openai,grpc", timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown protocol(s) ['grpc']")
    assert "Traceback" not in done.stderr and done.stdout == ""


def held_port_pair() -> tuple[Any, Any, int]:
    """Two sockets bound to ports N and N + 1 (not listening), and N: a pair this test owns,
    so no other socket on the machine can make the checks below name another port."""
    import socket

    for _ in range(50):
        first = socket.socket()
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        second = socket.socket()
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            second.bind(("127.0.0.1", port + 1))
        except OSError:
            first.close()
            second.close()
            continue
        return first, second, port
    raise RuntimeError("no two free consecutive ports")


def test_a_taken_port_is_named_before_a_server_starts(  # type: ignore[no-untyped-def]
    ceiling, tiny_bert_engine: Path
) -> None:
    """Else the readiness check finds the other server and the run measures it."""
    first, second, port = held_port_pair()
    with second:
        second.listen()  # the gRPC port (HTTP's + 1) taken by another server
        first.close()
        reason = ceiling.cannot_run_reason(tiny_bert_engine, ["openai"], port)
        assert reason == (
            f"port {port + 1} is in use (another server, or one still stopping): use --port"
        )
        assert ceiling.cannot_run_reason(tiny_bert_engine, ["openai"], port + 1)
    assert ceiling.cannot_run_reason(tiny_bert_engine, ["openai"], port) == ""


def test_the_compiled_c1_script_refuses_a_taken_port(tiny_bert_engine: Path) -> None:
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        done = run_script("compiled_c1_overhead.py", tiny_bert_engine, "--port", taken, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: port {taken} is in use")
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_failed_load_generator_is_one_line_not_a_traceback(ceiling) -> None:  # type: ignore[no-untyped-def]
    import os

    with pytest.raises(SystemExit) as stopped:
        ceiling.run_load(
            [sys.executable, "-c", "import sys; sys.exit('unable to connect to 127.0.0.1:9')"],
            os.getpid(),
        )
    assert str(stopped.value) == (
        f"error: {sys.executable} exited 1: unable to connect to 127.0.0.1:9"
    )
