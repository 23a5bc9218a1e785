"""What one launch of a CPU engine costs, by batch size, and where a one-token launch's time goes.

    python scripts/launch_probe.py ENGINE_DIR [--length 18] [--batches 1,2,4,8,32] [--rounds 5]

Times the engine's ONNX Runtime session directly (no server, no batcher), with the session
options `trtpipe serve` uses, on all-ones token inputs of ``--length`` positions:

- rows/s on one intra-op thread, on one two-thread session, and on two one-thread workers
  calling one shared session at once (the server's default CPU layout), per batch size;
- a one-token, batch-1 launch under ONNX Runtime's profiler: its time per operator type. What
  a one-token launch costs is what every launch pays whatever its size (its fixed cost).

Medians over ``--rounds``, after a warm-up, all in one run so a noisy machine moves every
column together. Served, a launch's size is set by what has arrived: this shows what small
launches cost against the large sorted ones of the offline figure. Nothing here is part of the
server.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def session(engine: Any, threads: int, profile_dir: str | None = None) -> Any:
    import onnxruntime as ort

    from trtpipe.runners.onnxruntime import session_options

    options = session_options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "launch")
    return ort.InferenceSession(
        str(engine.engine_path), options, providers=["CPUExecutionProvider"]
    )


def feeds(engine: Any, rows: int, length: int) -> dict[str, np.ndarray]:
    """The warm-up's inputs of one shape (token id 1, full attention, zero type ids), checked
    against the engine's profile as the server checks a request."""
    from trtpipe.runners.base import validate_feeds
    from trtpipe.runtime.warmup import warmup_feeds

    manifest = engine.manifest
    return validate_feeds(warmup_feeds(manifest, rows, length), manifest.inputs, manifest.profile)


def rows_per_s(run: Any, rows: int, calls: int, workers: int = 1) -> float:
    def loop() -> None:
        for _ in range(calls):
            run()

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return workers * calls * rows / (time.perf_counter() - start)


def by_batch(engine: Any, args: argparse.Namespace) -> None:
    narrow, wide = session(engine, 1), session(engine, 2)
    names = [o.name for o in narrow.get_outputs()]
    print(f"rows/s at {args.length} positions (medians of {args.rounds}):")
    print("| batch | 1 thread | one 2-thread session | two 1-thread workers, one session |")
    print("|---|---|---|---|")
    for rows in args.batches:
        inputs = feeds(engine, rows, args.length)
        calls = max(4, 160 // rows)
        for ort_session in (narrow, wide):
            for _ in range(5):
                ort_session.run(names, inputs)
        cells = []
        for ort_session, workers in ((narrow, 1), (wide, 1), (narrow, 2)):

            def run(s: Any = ort_session, batch: dict[str, np.ndarray] = inputs) -> None:
                s.run(names, batch)

            rates = [rows_per_s(run, rows, calls, workers) for _ in range(args.rounds)]
            cells.append(f"{statistics.median(rates):.0f}")
        print(f"| {rows} | " + " | ".join(cells) + " |")


def one_token_profile(engine: Any, calls: int = 50, warmup: int = 5) -> None:
    plain = session(engine, 1)
    names = [o.name for o in plain.get_outputs()]
    inputs = feeds(engine, 1, 1)

    def run() -> None:
        plain.run(names, inputs)

    launch_us = 1e6 / statistics.median(rows_per_s(run, 1, calls) for _ in range(5))
    with tempfile.TemporaryDirectory() as tmp:
        profiled = session(engine, 1, tmp)
        for _ in range(warmup + calls):
            profiled.run(names, inputs)
        events = json.loads(Path(profiled.end_profiling()).read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")
    warm = runs[warmup - 1][0] + runs[warmup - 1][1]  # the warm-up runs' nodes are left out
    by_op: dict[str, list[float]] = collections.defaultdict(list)
    for event in events:
        timed = event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
        if timed and event["ts"] > warm:
            by_op[event["args"]["op_name"]].append(event["dur"])
    total = sum(sum(d) for d in by_op.values()) / calls
    print(
        f"\none token, batch 1, one thread: {launch_us:.0f} us a launch; under the profiler, "
        f"{total:.0f} us a launch in operators:"
    )
    for op, durations in sorted(by_op.items(), key=lambda kv: -sum(kv[1]))[:6]:
        print(f"  {op}: {sum(durations) / calls:.0f} us ({len(durations) // calls} nodes)")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"want a whole number >= 1, got {text!r}")
    return value


def batch_sizes(text: str) -> list[int]:
    from trtpipe.bench.common import parse_int_list
    from trtpipe.errors import InputError

    try:
        return parse_int_list(text, "--batches")
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", type=Path)
    parser.add_argument("--length", type=positive, default=18)
    parser.add_argument("--batches", type=batch_sizes, default=[1, 2, 4, 8, 32])
    parser.add_argument("--rounds", type=positive, default=5)
    args = parser.parse_args()
    from trtpipe.engine import EngineDir
    from trtpipe.errors import TrtpipeError

    try:
        engine = EngineDir(args.engine)
        engine.expect_backend("onnxruntime")
        for rows in args.batches:
            feeds(engine, rows, args.length)  # every shape inside the profile before timing
    except TrtpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        by_batch(engine, args)
        one_token_profile(engine)
    except Exception as exc:  # ONNX Runtime raises its own types
        print(f"error: the engine's session failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
