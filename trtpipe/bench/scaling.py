"""Scaling: one workload dealt across 1..N devices through the runtime's device pool."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from trtpipe.bench.stats import median, ratio
from trtpipe.devices import Device, cpu_cores, parse_device, parse_gpus
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError

log = logging.getLogger(__name__)


def scaling_configs(devices: str | None = None, gpus: str | None = None) -> list[list[Device]]:
    """Device sets to compare, smallest first.

    ``--gpus 0,1,2`` -> [0], [0,1], [0,1,2]; ``--devices cpu:2`` -> 1 and 2 CPU workers;
    ``--devices cpu:1,cpu:2`` -> exactly those worker counts; ``--devices cuda:0,cuda:1`` ->
    the prefixes, like ``--gpus``.
    """
    if devices and gpus:
        raise InputError("give --devices or --gpus, not both")
    if gpus:
        chosen = parse_gpus(gpus)
        return [chosen[: n + 1] for n in range(len(chosen))]
    if not devices:
        raise InputError("scaling needs --devices cpu:N or --gpus 0,1")
    parts = [p.strip().lower() for p in devices.split(",") if p.strip()]
    if parts and all(p.startswith("cpu") for p in parts):
        counts = []
        for part in parts:
            _, _, count = part.partition(":")
            if count and (not count.isdigit() or int(count) < 1):
                raise InputError(f"bad --devices {devices!r}: cpu:N needs N >= 1")
            counts.append(int(count) if count else 1)
        if len(counts) == 1:
            counts = list(range(1, counts[0] + 1))
        return [[Device("cpu", i) for i in range(n)] for n in sorted(set(counts))]
    chosen = [parse_device(p) for p in parts]
    if len(set(chosen)) != len(chosen):
        raise InputError(f"--devices {devices!r} names a device twice")
    return [chosen[: n + 1] for n in range(len(chosen))]


@dataclass
class ScalingRow:
    devices: list[str]
    threads_per_worker: int | None
    seconds: list[float]
    sequences: int

    @property
    def sequences_per_s(self) -> float:
        return self.sequences / median(self.seconds)

    def to_dict(self, first: ScalingRow) -> dict[str, Any]:
        """Speed-up against the first (smallest) device set; efficiency per added device."""
        speedup = ratio(self.sequences_per_s, first.sequences_per_s)
        scale = len(self.devices) / len(first.devices)
        return {
            "devices": self.devices,
            "count": len(self.devices),
            "threads_per_worker": self.threads_per_worker,
            "sequences_per_s": self.sequences_per_s,
            "seconds_runs": self.seconds,
            "speedup": speedup,
            "efficiency": speedup / scale if speedup else None,
        }


@dataclass
class ScalingResult:
    batch_size: int
    seq_len: int
    batches: int
    rows: list[ScalingRow]

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "batches": self.batches,
            "rows": [row.to_dict(self.rows[0]) for row in self.rows],
        }


async def _deal(pool: Any, feeds: dict[str, Any], batches: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(pool.run(feeds) for _ in range(batches)))
    return time.perf_counter() - start


def bench_scaling(
    engine: EngineDir,
    configs: list[list[Device]],
    batch: int,
    seq: int,
    batches: int,
    runs: int,
    threads: int | None = None,
) -> ScalingResult:
    """``batches`` launches of ``batch`` x ``seq`` dealt across each device set."""
    from trtpipe.compare import random_feeds, vocab_size
    from trtpipe.runtime.pool import DevicePool

    rows = []
    for devices in configs:
        cpu_workers = sum(1 for d in devices if not d.is_gpu)
        per_worker = max(1, (threads or cpu_cores()) // cpu_workers) if cpu_workers else None
        pool = DevicePool.for_engine(engine, devices, threads_per_cpu_worker=per_worker)
        with pool:
            feeds = random_feeds(pool, batch, seq, vocab_size(engine.path), 0)  # type: ignore[arg-type]
            asyncio.run(_deal(pool, feeds, len(devices)))  # warm-up: one launch per device
            seconds = [asyncio.run(_deal(pool, feeds, batches)) for _ in range(runs)]
        row = ScalingRow([str(d) for d in devices], per_worker, seconds, batch * batches)
        log.info("%d device(s): %.1f seq/s", len(devices), row.sequences_per_s)
        rows.append(row)
    return ScalingResult(batch, seq, batches, rows)
