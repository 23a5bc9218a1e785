"""What a gRPC server alone costs per ModelInfer, for comparison with the gRPC front-end ceiling.

A bare gRPC server on uvloop (as `trtpipe serve` runs it) whose ModelInfer answers a fixed
response of the same shape as the served embedding model's, driven by h2load exactly as
`scripts/frontend_ceiling.py` drives the gRPC row. With `--thread-hop` the handler also waits
for another thread to resolve its future, the minimum any batcher with a device thread adds.
The gap between this floor and the ceiling's gRPC row is trtpipe's own work per request.
``--server`` picks the server, as `trtpipe serve --grpc-server` does: grpc.aio's own
(``grpcio``, the default here) or trtpipe's gRPC app on uvicorn's HTTP/2 (``uvicorn``).

With ``--round-trips N`` it times N back-to-back requests instead (concurrency 1) in each of
``--rounds`` rounds, sent by tritonclient's asyncio client from another process, as
``trtpipe bench --url`` sends them. That p50 is what gRPC alone adds to a c1 request, the part
of ``trtpipe bench``'s gRPC c1 overhead that is not trtpipe's.

    python scripts/grpc_aio_floor.py ENGINE_DIR [--server uvicorn] [--thread-hop] [--connections 64]
    python scripts/grpc_aio_floor.py ENGINE_DIR [--server uvicorn] --round-trips 1000 [--rounds 5]

h2load (Debian: apt-get install nghttp2-client) drives the throughput mode. Nothing here is
part of the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from frontend_ceiling import h2load, write_grpc_body  # scripts/ is on sys.path when run


def response() -> object:
    from tritonclient.grpc import service_pb2

    from trtpipe.bench.served_clients import POOLED

    reply = service_pb2.ModelInferResponse(model_name="m", model_version="1")
    reply.outputs.add(name=POOLED, datatype="FP32", shape=[1, 384])
    reply.raw_output_contents.append(np.zeros(384, np.float32).tobytes())
    return reply


def resolver(loop: asyncio.AbstractEventLoop, waiting: queue.SimpleQueue) -> None:
    """Resolve whatever futures are waiting, in one loop callback per wake-up."""
    while True:
        futures = [waiting.get()]
        while not waiting.empty():
            futures.append(waiting.get())
        loop.call_soon_threadsafe(resolve, futures)


def resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        future.set_result(None)


async def serve_and_drive(args: argparse.Namespace, body: Path) -> dict[str, float]:
    from tritonclient.grpc import service_pb2_grpc

    from trtpipe.server.grpc_front import serve_servicer

    reply = response()
    waiting: queue.SimpleQueue = queue.SimpleQueue()
    loop = asyncio.get_running_loop()
    threading.Thread(target=resolver, args=(loop, waiting), daemon=True).start()

    class Floor(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request: object, context: object) -> object:
            if args.thread_hop:
                future = loop.create_future()
                waiting.put(future)
                await future
            return reply

    server, port = await serve_servicer(args.server, Floor(), "127.0.0.1", 0, 64 << 20)
    url = f"http://127.0.0.1:{port}"
    pid = os.getpid()
    try:  # the load runs in a thread so that this loop keeps serving
        if args.round_trips:
            return await asyncio.to_thread(round_trip_p50, args, f"127.0.0.1:{port}", body)
        await asyncio.to_thread(h2load, url, body, args.connections, 2000, pid)  # warm-up
        return await asyncio.to_thread(h2load, url, body, args.connections, args.requests, pid)
    finally:
        await server.stop(1)


def round_trip_p50(args: argparse.Namespace, floor: str, body: Path) -> dict[str, float]:
    """The floor's c1 p50 in each round, and their median."""
    p50s = [statistics.median(client_round_trips(floor, body, args)) for _ in range(args.rounds)]
    runs = " / ".join(f"{v * 1e6:.0f}" for v in p50s)
    median = statistics.median(p50s) * 1e6
    print(f"{label(args)} c1 p50 per round: {runs} us (median {median:.0f})")
    return {"p50_us": median}


def label(args: argparse.Namespace) -> str:
    server = "grpc.aio" if args.server == "grpcio" else "uvicorn HTTP/2"
    return f"{server} + thread hop" if args.thread_hop else server


def client_round_trips(address: str, request: Path, args: argparse.Namespace) -> list[float]:
    """Seconds per request, from a client process of its own (as the bench's clients are)."""
    command = [sys.executable, __file__, "--client", address, str(request), str(args.round_trips)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the round-trip client failed: {done.stderr.strip()[-500:]}")
    return [float(v) for v in json.loads(done.stdout)]


def run_client(address: str, request_path: Path, count: int) -> None:
    """Send the framed request's tensors back to back with tritonclient's asyncio client; print
    the seconds of each (a tenth more sent first as warm-up)."""
    import tritonclient.grpc.aio as grpcclient
    import uvloop
    from tritonclient.grpc import service_pb2

    from trtpipe.server.grpc_codec import decode_request

    request = service_pb2.ModelInferRequest.FromString(request_path.read_bytes()[5:])
    inputs = []
    for tensor in decode_request(request).inputs:  # the server's own reading of the body
        entry = grpcclient.InferInput(tensor.name, tensor.shape, tensor.datatype)
        entry.set_data_from_numpy(tensor.data)
        inputs.append(entry)
    outputs = [grpcclient.InferRequestedOutput(o.name) for o in request.outputs]

    async def drive() -> list[float]:
        client = grpcclient.InferenceServerClient(address)
        seconds = []
        try:
            for _ in range(count + count // 10):
                start = time.perf_counter()
                await client.infer(request.model_name, inputs, outputs=outputs)
                seconds.append(time.perf_counter() - start)
        finally:
            await client.close()
        return seconds[count // 10 :]

    print(json.dumps(uvloop.run(drive())))


def main() -> int:
    if sys.argv[1:2] == ["--client"]:  # the client process of --round-trips
        run_client(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path, help="only its tokenizer and inputs are read")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--thread-hop", action="store_true")
    parser.add_argument(
        "--server",
        choices=["grpcio", "uvicorn"],
        default="grpcio",
        help="grpc.aio's server, or trtpipe's gRPC app on uvicorn's HTTP/2 (serve --grpc-server)",
    )
    parser.add_argument("--round-trips", type=int, default=0, help="c1 requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.round_trips < 0 or args.rounds < 1:
        parser.error("--round-trips must be at least 0 and --rounds at least 1")
    import uvloop

    from trtpipe.engine import EngineDir
    from trtpipe.errors import TrtpipeError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            EngineDir(args.engine)
            body = write_grpc_body(Path(tmp), args.engine, "m")
        except TrtpipeError as exc:  # no engine, or no tokenizer beside it
            print(f"error: {exc}", file=sys.stderr)
            return 2
        result = uvloop.run(serve_and_drive(args, body))
    if args.round_trips:
        return 0
    print(
        f"{label(args)} c{args.connections}: {result['requests_per_s']:.0f} req/s, "
        f"server CPU {result['server_cpu_us_per_request']:.0f} us/request "
        f"({result['main_thread_us_per_request']:.0f} on the loop thread), "
        f"non-2xx {result['non_2xx']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
