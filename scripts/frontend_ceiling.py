"""The front end's ceiling: `trtpipe serve --null-runner` driven by wrk (a compiled load generator).

The null runner answers every launch with zeros of the engine's output shapes at no cost, so
what this measures is HTTP parsing, routing, JSON, tokenization, batching and dispatch alone:
the rate a deployment whose engine is much faster than the front end (a GPU) runs into.

    python scripts/frontend_ceiling.py ENGINE_DIR [--connections 64] [--seconds 10]

Needs `wrk` (Debian: apt-get install wrk). Prints req/s per protocol and writes JSON with
--json. Python clients cannot drive these rates on 2 cores; wrk can, from one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

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


def write_bodies(work: Path, engine: Path, model: str) -> dict[str, tuple[Path, str, str, str]]:
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
                for s in SENTENCES
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
            for s in SENTENCES
        )
        + "\n"
    )
    files["v2-text"] = (v2_text, f"/v2/models/{model}/infer", "application/json", "")
    v2_binary = work / "v2_binary.txt"
    lines = []
    for ids in tokenizer(SENTENCES)["input_ids"]:
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(
    url: str, script: Path, connections: int, seconds: int, threads: int, pid: int
) -> dict[str, float]:
    cpu0 = cpu_seconds(pid)
    out = subprocess.run(
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
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    server_cpu = cpu_seconds(pid) - cpu0
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {
        "requests_per_s": rate,
        "server_cpu_us_per_request": 1e6 * server_cpu / max(done, 1),
        "non_2xx": float(bad.group(1)) if bad else 0.0,
        "socket_errors": errors.group(0) if errors else "",  # type: ignore[dict-item]
        "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--protocols", default="openai,openai-float,v2-text,v2-binary")
    parser.add_argument("--real-engine", action="store_true", help="serve the engine itself")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    model = "m"
    trtpipe = str(Path(sys.executable).parent / "trtpipe")
    command = [trtpipe, "serve", "--name", f"{model}={args.engine}"]
    command += ["--http-port", str(args.port), "--grpc-port", "0"]
    if not args.real_engine:
        command.append("--null-runner")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    results: dict[str, dict[str, float]] = {}
    try:
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            print("error: the server did not become ready", file=sys.stderr)
            return 1
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            files = write_bodies(work, args.engine, model)
            for protocol in args.protocols.split(","):
                bodies, path, content_type, extra = files[protocol]
                script = work / f"{protocol}.lua"
                script.write_text(
                    LUA
                    % {
                        "bodies": bodies,
                        "content_type": content_type,
                        "path": path,
                        "extra": extra,
                    }
                )
                wrk(url, script, args.connections, 2, args.threads, server.pid)  # warm-up
                results[protocol] = wrk(
                    url, script, args.connections, args.seconds, args.threads, server.pid
                )
                print(
                    f"{protocol:<10} c{args.connections}: "
                    f"{results[protocol]['requests_per_s']:.0f} req/s, "
                    f"p50 {results[protocol]['p50_ms']:.2f} ms, server CPU "
                    f"{results[protocol]['server_cpu_us_per_request']:.0f} us/request, "
                    f"non-2xx {results[protocol]['non_2xx']:.0f} "
                    f"{results[protocol]['socket_errors']}"
                )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
