"""The front end's ceiling: `trtpipe serve --null-runner` driven by compiled load generators.

The null runner answers every launch with zeros of the engine's output shapes at no cost, so
what this measures is HTTP/gRPC parsing, routing, JSON, tokenization, batching and dispatch
alone: the rate a deployment whose engine is much faster than the front end (a GPU) runs into.

    python scripts/frontend_ceiling.py ENGINE_DIR [--connections 64] [--seconds 10]

HTTP protocols need `wrk` (Debian: apt-get install wrk); `grpc-text` and `grpc-tokens` need
`h2load` (Debian: apt-get install nghttp2-client), which speaks HTTP/2 and so sends gRPC's framed
ModelInfer requests itself. Prints req/s and the p50 time to a reply per protocol and writes
JSON with --json. Python clients cannot drive these rates on 2 cores; wrk and h2load can, from
one thread.

With ``--connections 1`` the p50 is what the front end adds to each lone request: on a GPU,
whose batch-1 launch leaves the CPU to the front end, a c1 request takes about that plus the
engine's own batch-1 time.

h2load sees HTTP status only, and gRPC carries its errors in trailers under HTTP 200, so the
gRPC rows also count the server's own success and failure counters (/metrics) over the run:
`grpc_failures` must be 0 and `grpc_successes` must equal the requests h2load completed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from served_under_test import port_in_use, serve_command, start_server, stop_server, wait_ready

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Serving engines should be fast.",
    "The quick brown fox jumps over the lazy dog.",
    "Two dogs play in the snow near a frozen lake.",
    "Inference servers batch requests of different lengths.",
    "She sells sea shells by the sea shore.",
    "A woman is slicing an onion in a small kitchen.",
]

LUA = """
local bodies = {}
local count = 0
for line in io.lines("%(bodies)s") do
  count = count + 1
  bodies[count] = line
end
local headers = {}
headers["Content-Type"] = "%(content_type)s"
local index = 0
request = function()
  index = index %% count + 1
  local body = bodies[index]
  %(extra)s
  return wrk.format("POST", "%(path)s", headers, body)
end
"""

# v2 binary bodies hold raw bytes: the Lua side reads one hex line per body and decodes it.
HEX_EXTRA = """local header_length, hex = body:match("^(%d+) (.*)$")
  headers["Inference-Header-Content-Length"] = header_length
  body = (hex:gsub("..", function(cc) return string.char(tonumber(cc, 16)) end))"""


def write_bodies(
    work: Path, engine: Path, model: str, sentences: list[str] = SENTENCES
) -> dict[str, tuple[Path, str, str, str]]:
    """One request body per sentence and protocol, for wrk to cycle through in order."""
    from trtpipe.bench.served_clients import binary_token_body, token_arrays
    from trtpipe.engine import EngineDir
    from trtpipe.text import load_tokenizer

    tokenizer = load_tokenizer(str(engine))
    inputs = [s.name for s in EngineDir(engine).manifest.inputs]
    files: dict[str, tuple[Path, str, str, str]] = {}
    # "openai": base64 vectors, what the openai SDK asks for by default; "openai-float": numbers.
    for name, encoding in (("openai", "base64"), ("openai-float", "float")):
        path = work / f"{name}.txt"
        path.write_text(
            "\n".join(
                json.dumps({"model": model, "input": s, "encoding_format": encoding})
                for s in sentences
            )
            + "\n"
        )
        files[name] = (path, "/v1/embeddings", "application/json", "")
    v2_text = work / "v2_text.txt"
    v2_text.write_text(
        "\n".join(
            json.dumps(
                {
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [s]}],
                    "outputs": [{"name": "sentence_embedding"}],
                }
            )
            for s in sentences
        )
        + "\n"
    )
    files["v2-text"] = (v2_text, f"/v2/models/{model}/infer", "application/json", "")
    v2_binary = work / "v2_binary.txt"
    lines = []
    for ids in tokenizer(sentences)["input_ids"]:
        body, length = binary_token_body(token_arrays(ids, inputs))
        lines.append(f"{length} {body.hex()}")
    v2_binary.write_text("\n".join(lines) + "\n")
    files["v2-binary"] = (
        v2_binary,
        f"/v2/models/{model}/infer",
        "application/octet-stream",
        HEX_EXTRA,
    )
    return files


def grpc_sentence(engine: Path, sentences: list[str]) -> int:
    """h2load repeats one body, so the gRPC rows send the sentence of median token length."""
    from trtpipe.text import load_tokenizer

    lengths = [len(ids) for ids in load_tokenizer(str(engine))(sentences)["input_ids"]]
    return sorted(range(len(sentences)), key=lengths.__getitem__)[len(sentences) // 2]


def write_grpc_body(
    work: Path,
    engine: Path,
    model: str,
    sentences: list[str] = SENTENCES,
    protocol: str = "grpc-tokens",
) -> Path:
    """One gRPC-framed ModelInfer request of the sentence :func:`grpc_sentence` picks, with raw
    contents as tritonclient sends them: its token tensors (``grpc-tokens``) or the BYTES
    ``text`` input (``grpc-text``: a 4-byte little-endian length, then the UTF-8 text)."""
    from tritonclient.grpc import service_pb2

    from trtpipe.bench.served_clients import POOLED, token_arrays
    from trtpipe.engine import EngineDir
    from trtpipe.server.grpc_asgi import frame
    from trtpipe.server.protocol import encode_bytes_tensor
    from trtpipe.text import load_tokenizer

    sentence = sentences[grpc_sentence(engine, sentences)]
    request = service_pb2.ModelInferRequest(model_name=model)
    if protocol == "grpc-text":
        request.inputs.add(name="text", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(encode_bytes_tensor([sentence]))
    else:
        inputs = [s.name for s in EngineDir(engine).manifest.inputs]
        ids = load_tokenizer(str(engine))([sentence])["input_ids"][0]
        for name, array in token_arrays(ids, inputs).items():
            request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
            request.raw_input_contents.append(array.tobytes())
    request.outputs.add(name=POOLED)
    path = work / f"{protocol.replace('-', '_')}.bin"
    path.write_bytes(frame(request))  # one uncompressed gRPC message
    return path


def request_counters(url: str, model: str) -> tuple[float, float]:
    """The server's (success, failure) request counters of one model, from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as reply:
        return parse_request_counters(reply.read().decode(), model)


def parse_request_counters(text: str, model: str) -> tuple[float, float]:
    """(success, failure) of ``model`` in Prometheus text; 0 where a counter is absent."""
    counts = {"success": 0.0, "failure": 0.0}
    for kind in counts:
        line = rf'^nv_inference_request_{kind}{{model="{re.escape(model)}"[^}}]*}} (\S+)$'
        found = re.search(line, text, re.M)
        if found:
            counts[kind] = float(found.group(1))
    return counts["success"], counts["failure"]


# trtpipe's gRPC server (uvicorn) retires a connection after 3,072 calls with a graceful GOAWAY
# (trtpipe.server.grpc_connection.ROTATE_AFTER_STREAMS), and h2load does not reconnect: it
# counts the rest of that connection's calls as failed. Stay below it.
H2LOAD_CALLS_PER_CONNECTION = 3000


def h2load(
    grpc_url: str, body: Path, connections: int, requests: int, pid: int, counters: Any = None
) -> dict[str, float]:
    """``requests`` unary ModelInfer calls from h2load, one stream per connection (as wrk's
    connections). A fixed count, not a duration, so that the server's counters must match;
    ``counters`` reads them (None: a server without them)."""
    if requests > connections * H2LOAD_CALLS_PER_CONNECTION:
        raise SystemExit(
            f"h2load: {requests} calls over {connections} connections is more than "
            f"{H2LOAD_CALLS_PER_CONNECTION} per connection, past which the gRPC server moves a "
            "client to a new connection and h2load does not follow: raise --connections"
        )
    success0, failure0 = counters() if counters else (0.0, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.tsv"
        out, server_cpu, main_cpu = run_load(
            [
                "h2load",
                f"-c{connections}",
                "-m1",
                f"-n{requests}",
                f"--log-file={log}",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-d",
                str(body),
                grpc_url + "/inference.GRPCInferenceService/ModelInfer",
            ],
            pid,
        )
        p50 = h2load_p50_ms(log.read_text())
    success1, failure1 = counters() if counters else (0.0, 0.0)
    rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) done", out).group(1))  # type: ignore[union-attr]
    succeeded = int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    return {
        "requests_per_s": rate,
        "server_cpu_us_per_request": 1e6 * server_cpu / max(done, 1),
        "main_thread_us_per_request": 1e6 * main_cpu / max(done, 1),
        "non_2xx": float(requests - succeeded),
        "socket_errors": "",  # type: ignore[dict-item]
        "mean_ms": float(mean.group(1)) * MS_PER_UNIT[mean.group(2)] if mean else float("nan"),
        "p50_ms": p50,
        "completed": float(done),
        "grpc_successes": success1 - success0,
        "grpc_failures": failure1 - failure0,
    }


def h2load_p50_ms(log: str) -> float:
    """The median time to a complete reply, in ms, from h2load's ``--log-file`` (one row per
    request: start in us since the epoch, HTTP status, us to the end of the reply)."""
    elapsed = [int(row.split("\t")[2]) for row in log.splitlines() if row.strip()]
    return statistics.median(elapsed) / 1000.0 if elapsed else float("nan")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process and its threads, or of one thread (from /proc)."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_seconds(pid: int) -> float:
    """CPU time of the server's main thread alone: the event loop, which holds the GIL for
    all of the front end's Python, so its share per request is what bounds the ceiling."""
    return cpu_seconds(pid, pid)


MS_PER_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_load(command: list[str], pid: int) -> tuple[str, float, float]:
    """Run a load generator; its output, and the server's CPU seconds (all threads, and the
    loop thread alone) spent meanwhile."""
    cpu0, main0 = cpu_seconds(pid), main_thread_seconds(pid)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # e.g. the server went away: say so, no traceback
        said = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        raise SystemExit(f"error: {command[0]} exited {done.returncode}: {said[-1]}")
    return done.stdout, cpu_seconds(pid) - cpu0, main_thread_seconds(pid) - main0


def wrk(
    url: str, script: Path, connections: int, seconds: int, threads: int, pid: int
) -> dict[str, float]:
    out, server_cpu, main_cpu = run_load(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        pid,
    )
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    return {
        "requests_per_s": rate,
        "server_cpu_us_per_request": 1e6 * server_cpu / max(done, 1),
        "main_thread_us_per_request": 1e6 * main_cpu / max(done, 1),
        "non_2xx": float(bad.group(1)) if bad else 0.0,
        "socket_errors": errors.group(0) if errors else "",  # type: ignore[dict-item]
        "p50_ms": float(p50.group(1)) * MS_PER_UNIT[p50.group(2)] if p50 else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--port", type=int, default=18080, help="HTTP; gRPC listens on the next")
    parser.add_argument(
        "--protocols", default="openai,openai-float,v2-text,v2-binary,grpc-text,grpc-tokens"
    )
    parser.add_argument("--real-engine", action="store_true", help="serve the engine itself")
    parser.add_argument(
        "--grpc-server", default="auto", help="passed to trtpipe serve: auto, uvicorn or grpcio"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    protocols = args.protocols.split(",")
    reason = cannot_run_reason(args.engine, protocols, args.port)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    model = "m"
    command = serve_command(args.engine, model, args.port, not args.real_engine, args.grpc_server)
    with tempfile.TemporaryFile(mode="w+") as server_log:
        results = measure(args, protocols, command, model, server_log)
    if isinstance(results, int):
        return results
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


PROTOCOLS = ("openai", "openai-float", "v2-text", "v2-binary", "grpc-text", "grpc-tokens")


def cannot_run_reason(engine: Path, protocols: list[str], port: int | None = None) -> str:
    """What stops a run here, checked before any server starts: no engine, an unknown
    protocol, a load generator this machine lacks, or ``port`` (HTTP) or the next (gRPC)
    already taken ('' when nothing does). A taken port matters most: the readiness check
    would find the other server and the run would measure it."""
    from trtpipe.engine import EngineDir
    from trtpipe.errors import TrtpipeError

    try:
        EngineDir(engine)
    except TrtpipeError as exc:
        return str(exc)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        return f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}"
    needed = {"h2load" if p.startswith("grpc") else "wrk" for p in protocols}
    for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if tool in needed and shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if port is not None:
        for taken in (port, port + 1):
            if port_in_use(taken):
                return f"port {taken} is in use (another server, or one still stopping): use --port"
    return ""


def measure(
    args: argparse.Namespace,
    protocols: list[str],
    command: list[str],
    model: str,
    server_log: Any,
) -> dict[str, dict[str, float]] | int:
    """Start the server (its log to ``server_log``), drive each protocol; the results, or an
    exit code when the server never became ready."""
    server = start_server(command, server_log)
    results: dict[str, dict[str, float]] = {}
    try:
        url = f"http://127.0.0.1:{args.port}"
        grpc_url = f"http://127.0.0.1:{args.port + 1}"
        failed = wait_ready(server, url, server_log)
        if failed:
            return failed
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            files = write_bodies(work, args.engine, model)
            for protocol in protocols:
                if protocol.startswith("grpc"):
                    results[protocol] = run_grpc(
                        args, work, model, url, grpc_url, server.pid, protocol
                    )
                else:
                    results[protocol] = run_http(
                        args, work, files[protocol], protocol, url, server.pid
                    )
                result = results[protocol]
                latency = f"p50 {result['p50_ms']:.2f} ms"
                grpc_check = (
                    f", h2load completed {result['completed']:.0f}, server counted "
                    f"{result['grpc_successes']:.0f} ok {result['grpc_failures']:.0f} failed"
                    if "grpc_successes" in result
                    else ""
                )
                print(
                    f"{protocol:<11} c{args.connections}: {result['requests_per_s']:.0f} req/s, "
                    f"{latency}, server CPU {result['server_cpu_us_per_request']:.0f} us/request "
                    f"({result['main_thread_us_per_request']:.0f} on the loop thread), "
                    f"non-2xx {result['non_2xx']:.0f}{grpc_check} {result['socket_errors']}"
                )
    finally:
        stop_server(server)
    return results


def run_http(
    args: argparse.Namespace,
    work: Path,
    files: tuple[Path, str, str, str],
    protocol: str,
    url: str,
    pid: int,
) -> dict[str, float]:
    """wrk with a Lua script that cycles through the protocol's bodies: warm-up, then the run."""
    script = write_script(work, files, protocol)
    wrk(url, script, args.connections, 2, args.threads, pid)  # warm-up
    return wrk(url, script, args.connections, args.seconds, args.threads, pid)


def write_script(work: Path, files: tuple[Path, str, str, str], protocol: str) -> Path:
    """wrk's Lua script that posts the protocol's bodies in turn."""
    bodies, path, content_type, extra = files
    script = work / f"{protocol}.lua"
    script.write_text(
        LUA % {"bodies": bodies, "content_type": content_type, "path": path, "extra": extra}
    )
    return script


def run_grpc(
    args: argparse.Namespace,
    work: Path,
    model: str,
    url: str,
    grpc_url: str,
    pid: int,
    protocol: str,
) -> dict[str, float]:
    """h2load: a warm-up that also sizes the run, then about --seconds worth of requests."""
    body = write_grpc_body(work, args.engine, model, protocol=protocol)

    def counters() -> tuple[float, float]:
        return request_counters(url, model)

    warm = h2load(grpc_url, body, args.connections, 2000, pid, counters)
    requests = max(1000, int(warm["requests_per_s"] * args.seconds))
    most = args.connections * H2LOAD_CALLS_PER_CONNECTION
    if requests > most:
        print(
            f"gRPC: {most} calls instead of {requests} "
            f"({H2LOAD_CALLS_PER_CONNECTION} per connection)"
        )
        requests = most
    return h2load(grpc_url, body, args.connections, requests, pid, counters)


if __name__ == "__main__":
    sys.exit(main())
