"""Check trtpipe's CUDA runtime helpers on a real GPU, without TensorRT.

What the TensorRT runner and the CUDA shared memory extension stand on, exercised for real
(the test suite runs them against strict fakes): a non-blocking stream, pinned host buffers and
their batch views, asynchronous copies to the device and back, and a CUDA IPC handle exported by
another process, opened, sized and read the way the server does. Needs numpy and cuda-python
only. Prints what it measured; ``--json PATH`` also writes it. Exit 0 when every check holds, 1
when one fails, 2 when there is no usable GPU.

    python scripts/check_cuda_runtime.py --json cuda_check.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from trtpipe import cuda, cuda_ipc
from trtpipe.errors import RunnerError

# The exporting process: device memory with a known pattern, its IPC handle on stdout, then it
# keeps the memory alive until its stdin closes.
EXPORTER = """
import ctypes
import sys
import numpy as np
from cuda.bindings import runtime as rt
count = int(sys.argv[1])
err, ptr = rt.cudaMalloc(count * 4); assert int(err) == 0, err
data = np.arange(count, dtype=np.float32) * 0.5
err, = rt.cudaMemcpy(ptr, data.ctypes.data, count * 4, rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
assert int(err) == 0, err
err, handle = rt.cudaIpcGetMemHandle(ptr); assert int(err) == 0, err
sys.stdout.write(ctypes.string_at(handle.getPtr(), 64).hex() + "\\n"); sys.stdout.flush()
sys.stdin.read()
rt.cudaFree(ptr)
"""


def round_trip(stream: cuda.Stream, shape: tuple[int, ...]) -> dict[str, Any]:
    """Pinned host -> device -> pinned host on ``stream``; a smaller batch through the views."""
    source = cuda.PinnedHostBuffer(np.float32, shape)
    back = cuda.PinnedHostBuffer(np.float32, shape)
    device = cuda.DeviceBuffer(source.nbytes)
    try:
        source.array[:] = np.random.default_rng(0).standard_normal(source.size, np.float32)
        cuda.memcpy_htod_async(device.ptr, source.ptr, source.nbytes, stream)
        cuda.memcpy_dtoh_async(back.ptr, device.ptr, back.nbytes, stream)
        stream.synchronize()
        full = bool(np.array_equal(source.array, back.array))
        small = (2, *shape[1:])  # a batch of 2 in buffers sized for the profile maximum
        view = source.view(small)
        view[:] = 7.0
        nbytes = view.nbytes
        back.array[:] = 0.0
        cuda.memcpy_htod_async(device.ptr, source.ptr, nbytes, stream)
        cuda.memcpy_dtoh_async(back.ptr, device.ptr, nbytes, stream)
        stream.synchronize()
        prefix = bool(np.all(back.view(small) == 7.0)) and bool(
            np.all(back.array[view.size :] == 0)
        )
        try:
            source.view((shape[0] + 1, *shape[1:]))
            refused = False
        except RunnerError:
            refused = True
        return {
            "full_copy_equal": full,
            "batch_view_copy_equal": prefix,
            "oversize_view_refused": refused,
        }
    finally:
        device.close()
        back.close()
        source.close()


def copy_rate(stream: cuda.Stream, mib: int, runs: int = 5) -> dict[str, Any]:
    """Host-to-device bandwidth from pinned memory, and how long the async call itself takes."""
    host = cuda.PinnedHostBuffer(np.uint8, (mib << 20,))
    device = cuda.DeviceBuffer(host.nbytes)
    host.array[:] = 1
    try:
        enqueue, total = [], []
        for _ in range(runs + 1):  # the first is a warm-up
            start = time.perf_counter()
            cuda.memcpy_htod_async(device.ptr, host.ptr, host.nbytes, stream)
            queued = time.perf_counter()
            stream.synchronize()
            done = time.perf_counter()
            enqueue.append(queued - start)
            total.append(done - start)
        enqueue, total = enqueue[1:], total[1:]
        median = float(np.median(total))
        return {
            "mib": mib,
            "h2d_gb_per_s": host.nbytes / median / 1e9,
            "enqueue_ms_median": 1e3 * float(np.median(enqueue)),
            "copy_ms_median": 1e3 * median,
        }
    finally:
        device.close()
        host.close()


def ipc(stream: cuda.Stream, count: int = 1 << 20) -> dict[str, Any]:
    """Open another process's allocation by its handle, size it, read it, close it."""
    exporter = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert exporter.stdout is not None and exporter.stdin is not None
        raw = bytes.fromhex(exporter.stdout.readline().strip())
        ptr = cuda_ipc.open_mem_handle(raw, 0)
        try:
            size = cuda_ipc.bytes_from(ptr)
            host = cuda.PinnedHostBuffer(np.float32, (count,))
            try:
                cuda.memcpy_dtoh_async(host.ptr, ptr, count * 4, stream)
                stream.synchronize()
                equal = bool(np.array_equal(host.array, np.arange(count, dtype=np.float32) * 0.5))
            finally:
                host.close()
        finally:
            cuda_ipc.close_mem_handle(ptr, 0)
        errors = {}
        for name, bad in (("short handle", b"\0" * 10), ("foreign handle", bytes(range(64)))):
            try:
                cuda_ipc.open_mem_handle(bad, 0)
                errors[name] = None
            except RunnerError as exc:
                errors[name] = str(exc)
        return {
            "handle_bytes": len(raw),
            "mapped_bytes_from_ptr": size,
            "needed_bytes": count * 4,
            "read_equal": equal,
            "bad_handles": errors,
        }
    finally:
        if exporter.stdin is not None:
            exporter.stdin.close()
        exporter.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--mib", type=int, default=256, help="size of the bandwidth copy")
    args = parser.parse_args()
    reason = cuda.unusable_reason()
    if reason is not None:
        print(f"no usable GPU: {reason}", file=sys.stderr)
        return 2
    cuda.set_device(0)
    report: dict[str, Any] = {
        "devices": cuda.device_count(),
        "device_0": cuda.device_name(0),
        "compute_capability": cuda.device_compute_capability(0),
    }
    stream = cuda.Stream()
    try:
        report["stream_handle_nonzero"] = stream.handle != 0
        report["round_trip"] = round_trip(stream, (32, 128, 384))
        report["copy"] = copy_rate(stream, args.mib)
        report["ipc"] = ipc(stream)
    finally:
        stream.close()
    checks = {
        "round trip": all(report["round_trip"].values()),
        "async enqueue": report["copy"]["enqueue_ms_median"] < report["copy"]["copy_ms_median"] / 4,
        "ipc read": report["ipc"]["read_equal"],
        "ipc size": report["ipc"]["mapped_bytes_from_ptr"] >= report["ipc"]["needed_bytes"],
        "ipc bad handles refused": all(report["ipc"]["bad_handles"].values()),
    }
    report["checks"] = checks
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
