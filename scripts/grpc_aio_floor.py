"""What grpc.aio alone costs per ModelInfer, for comparison with the gRPC front-end ceiling.

A bare grpc.aio server on uvloop (as `trtpipe serve` runs it) whose ModelInfer answers a fixed
response of the same shape as the served embedding model's, driven by h2load exactly as
`scripts/frontend_ceiling.py` drives the gRPC row. With `--thread-hop` the handler also waits
for another thread to resolve its future, the minimum any batcher with a device thread adds.
The gap between this floor and the ceiling's gRPC row is trtpipe's own work per request.

    python scripts/grpc_aio_floor.py ENGINE_DIR [--thread-hop] [--connections 64]

Needs h2load (Debian: apt-get install nghttp2-client). Nothing here is part of the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sys
import tempfile
import threading
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
    import grpc
    from tritonclient.grpc import service_pb2_grpc

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

    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Floor(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    url = f"http://127.0.0.1:{port}"
    pid = os.getpid()
    try:  # h2load runs in a thread so that this loop keeps serving
        await asyncio.to_thread(h2load, url, body, args.connections, 2000, pid)  # warm-up
        return await asyncio.to_thread(h2load, url, body, args.connections, args.requests, pid)
    finally:
        await server.stop(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path, help="only its tokenizer and inputs are read")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--thread-hop", action="store_true")
    args = parser.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory() as tmp:
        body = write_grpc_body(Path(tmp), args.engine, "m")
        result = uvloop.run(serve_and_drive(args, body))
    label = "grpc.aio + thread hop" if args.thread_hop else "grpc.aio"
    print(
        f"{label} c{args.connections}: {result['requests_per_s']:.0f} req/s, "
        f"server CPU {result['server_cpu_us_per_request']:.0f} us/request "
        f"({result['main_thread_us_per_request']:.0f} on the loop thread), "
        f"non-2xx {result['non_2xx']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
