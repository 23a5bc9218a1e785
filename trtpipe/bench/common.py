"""What every benchmark mode shares: option parsing, runners with equal threads, the gate."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from trtpipe.devices import Device
from trtpipe.engine import EngineDir, Manifest
from trtpipe.errors import InputError
from trtpipe.runners.base import Runner

log = logging.getLogger(__name__)

# A short pause between the two sides of an interleaved pair, so that one library's spinning
# worker threads have gone to sleep before the other starts (ONNX Runtime and OpenMP both spin).
SETTLE_S = 0.02


def parse_int_list(text: str, option: str) -> list[int]:
    """``"1,8,32"`` -> [1, 8, 32]; a clear error for anything else."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise InputError(
            f"bad {option} {text!r}: use comma-separated positive integers such as 1,8,32"
        )
    return sorted({int(p) for p in parts})


def default_device(manifest: Manifest) -> Device:
    return Device("cuda", 0) if manifest.backend == "tensorrt" else Device("cpu")


def engine_runner(engine: EngineDir, device: Device, threads: int) -> Runner:
    """The engine's runner with ``threads`` intra-op threads on CPU (not loaded)."""
    from trtpipe.runners import runner_for

    runner = runner_for(engine, device)
    if not device.is_gpu and hasattr(runner, "threads"):
        runner.threads = threads
    return runner


def baseline_runner(
    manifest: Manifest, device: Device, threads: int, reference: str | None = None
) -> Runner:
    """PyTorch eager, fp32 on CPU and fp16 on GPU, with the same threads as the engine."""
    from trtpipe.runners.torch import reference_runner

    dtype = "float16" if device.is_gpu else "float32"
    return reference_runner(manifest, reference, device=device, dtype=dtype, threads=threads)


def sequence_range(manifest: Manifest) -> tuple[int, int]:
    """(min, max) sequence length the engine's profile accepts."""
    for name, shape_range in manifest.profile.items():
        spec = next((s for s in manifest.inputs if s.name == name), None)
        if spec is not None and len(spec.dims) > 1 and spec.dims[1] == "sequence":
            return shape_range.min[1], shape_range.max[1]
    lows = [r.min[1] for r in manifest.profile.values() if len(r.min) > 1]
    highs = [r.max[1] for r in manifest.profile.values() if len(r.max) > 1]
    return (max(lows) if lows else 1), (min(highs) if highs else 512)


def check_shapes(manifest: Manifest, batch_sizes: list[int], seq_lens: list[int]) -> None:
    """Refuse shapes outside the engine's profile before loading anything."""
    max_batch = manifest.max_batch_size
    too_big = [b for b in batch_sizes if b > max_batch]
    if too_big:
        raise InputError(
            f"--batch-sizes {too_big} exceed the engine's maximum batch {max_batch}; "
            f"use sizes up to {max_batch} or rebuild with a larger --max-shapes"
        )
    low, high = sequence_range(manifest)
    bad = [s for s in seq_lens if not low <= s <= high]
    if bad:
        raise InputError(
            f"--seq-lens {bad} are outside the engine's profile ({low}..{high}); "
            "rebuild with other --min-shapes/--max-shapes or pick lengths inside it"
        )


def alternate(runs: int) -> Iterator[tuple[int, bool]]:
    """(run index, engine first?) in an ABBA order, so drift hits both sides alike."""
    for index in range(runs):
        yield index, index % 2 == 0


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result
