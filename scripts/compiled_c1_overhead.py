"""The c1 overhead of `trtpipe serve` with a compiled client: wrk and h2load instead of Python.

`trtpipe bench --url --texts` times its c1 level with its own Python client, which on a small
machine shares the cores with the server and the engine, so its own round trip is part of the
overhead it reports. This script serves the real engine and drives it one request at a time
with the compiled load generators of scripts/frontend_ceiling.py, alternating with blocks of
direct batch-1 calls of the same sentences through the same engine, in this process, with the
intra-op threads of the server's lone launch (as the bench does):

    python scripts/compiled_c1_overhead.py ENGINE_DIR [--sentences 64] [--pairs 5]

Per protocol it prints each pair's served p50 minus direct p50 and their median. The HTTP rows
cycle through the first --sentences sentences of the corpus; h2load repeats one body, so the
gRPC rows (and their direct calls) use the one of median length. wrk and h2load see only the
status (and the gRPC rows check the server's own counters): reply contents are checked by
`trtpipe bench --url`, not here.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import frontend_ceiling as ceiling
import served_under_test as served

CORPUS = Path(__file__).resolve().parents[1] / "trtpipe" / "data" / "bench_corpus.txt"


def direct_p50_ms(seconds: Any, rows: list[int], calls: int) -> float:
    """p50 of ``calls`` back-to-back batch-1 calls cycling through ``rows`` (``seconds``: the
    bench's :func:`~trtpipe.bench.served_offline.direct_batch1`)."""
    return statistics.median(seconds([rows[call % len(rows)] for call in range(calls)])) * 1e3


def served_p50_ms(args: argparse.Namespace, protocol: str, load: dict[str, Any]) -> float:
    """One served block: wrk or h2load at one connection, its p50 in ms. Exits when a
    request failed: a failed request's time is no overhead figure."""
    if protocol.startswith("grpc"):
        calls = max(200, int(args.seconds * load["rate"]))
        calls = min(calls, ceiling.H2LOAD_CALLS_PER_CONNECTION)
        result = ceiling.h2load(
            load["grpc_url"], load["body"], 1, calls, load["pid"], load["counters"]
        )
        failed = f"{result['grpc_failures']:.0f} gRPC errors, {result['non_2xx']:.0f} non-200"
        bad = result["grpc_failures"] + result["non_2xx"]
    else:
        result = ceiling.wrk(load["url"], load["script"], 1, args.seconds, 1, load["pid"])
        failed = f"{result['non_2xx']:.0f} non-2xx {result['socket_errors']}".strip()
        bad = result["non_2xx"] + (1 if result["socket_errors"] else 0)
    if bad:
        raise SystemExit(
            f"error: {protocol}: requests failed in a served block ({failed}); "
            "a failed request's time is no overhead figure"
        )
    return float(result["p50_ms"])


def overhead_pairs(
    args: argparse.Namespace, protocol: str, load: dict[str, Any], run: Any, rows: list[int]
) -> list[dict[str, float]]:
    served_p50_ms(args, protocol, load)  # warm-up of this protocol's path
    pairs = []
    for _ in range(args.pairs):
        served = served_p50_ms(args, protocol, load)
        time.sleep(0.2)  # the server's spinning threads idle before the direct block
        direct = direct_p50_ms(run, rows, args.direct_calls)
        time.sleep(0.2)
        pairs.append({"served_p50_ms": served, "direct_p50_ms": direct})
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--sentences", type=int, default=64, help="from the bench corpus")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4, help="per served block")
    parser.add_argument("--direct-calls", type=int, default=200, help="per direct block")
    parser.add_argument("--port", type=int, default=18090, help="HTTP; gRPC listens on the next")
    parser.add_argument("--protocols", default="openai,v2-text,v2-binary,grpc-text,grpc-tokens")
    args = parser.parse_args()
    protocols = args.protocols.split(",")
    reason = ceiling.cannot_run_reason(args.engine, protocols, args.port)
    if min(args.sentences, args.pairs, args.seconds, args.direct_calls) < 1:
        reason = reason or "each count given must be at least 1"
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    sentences = [line for line in CORPUS.read_text().splitlines() if line.strip()]
    sentences = sentences[: args.sentences]
    model = "m"
    command = served.serve_command(args.engine, model, args.port, null_runner=False)
    with tempfile.TemporaryFile(mode="w+") as server_log:
        server = served.start_server(command, server_log)
        try:
            url = f"http://127.0.0.1:{args.port}"
            failed = served.wait_ready(server, url, server_log)
            if failed:
                return failed
            measure(args, protocols, sentences, model, url, server.pid)
        finally:
            served.stop_server(server)
    return 0


def measure(
    args: argparse.Namespace,
    protocols: list[str],
    sentences: list[str],
    model: str,
    url: str,
    pid: int,
) -> None:
    from trtpipe.bench.served_offline import direct_batch1
    from trtpipe.bench.served_text import lone_launch_threads
    from trtpipe.bench.server_readings import server_stats
    from trtpipe.engine import EngineDir
    from trtpipe.text import load_tokenizer

    engine = EngineDir(args.engine)
    manifest = engine.manifest
    threads = lone_launch_threads(asyncio.run(server_stats(url, model))) or 1
    tokenizer = load_tokenizer(str(engine.path))
    ids = tokenizer(sentences)["input_ids"]
    pad_id = tokenizer.pad_token_id or 0
    one = ceiling.grpc_sentence(args.engine, sentences)
    with (
        tempfile.TemporaryDirectory() as tmp,
        direct_batch1(args.engine, ids, pad_id, threads) as run,
    ):
        work = Path(tmp)
        files = ceiling.write_bodies(work, args.engine, model, sentences)
        print(
            f"{engine.path.name} ({manifest.precision}), direct calls on {threads} thread(s), "
            f"{len(sentences)} sentences (gRPC: sentence {one}, {len(ids[one])} tokens)"
        )
        for protocol in protocols:
            load: dict[str, Any] = {"url": url, "pid": pid}
            rows = list(range(len(sentences)))
            if protocol.startswith("grpc"):
                rows = [one]
                load["grpc_url"] = f"http://127.0.0.1:{args.port + 1}"
                load["body"] = ceiling.write_grpc_body(
                    work, args.engine, model, sentences, protocol
                )
                load["rate"] = 1000.0 / max(direct_p50_ms(run, rows, 20), 0.1)
                load["counters"] = partial(ceiling.request_counters, url, model)
            else:
                load["script"] = ceiling.write_script(work, files[protocol], protocol)
            pairs = overhead_pairs(args, protocol, load, run, rows)
            overheads = [p["served_p50_ms"] - p["direct_p50_ms"] for p in pairs]
            print(
                f"{protocol:<11} c1 overhead {statistics.median(overheads):.2f} ms (median of "
                + ", ".join(f"{o:.2f}" for o in overheads)
                + "; served p50 "
                + ", ".join(f"{p['served_p50_ms']:.2f}" for p in pairs)
                + "; direct p50 "
                + ", ".join(f"{p['direct_p50_ms']:.2f}" for p in pairs)
                + " ms)"
            )


if __name__ == "__main__":
    sys.exit(main())
