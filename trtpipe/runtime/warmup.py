"""Warm-up: every shape the batcher will launch runs once on a device before it serves.

Like Triton's model warm-up: the first launch of a shape pays for memory arenas, kernel
selection and (on GPUs) lazy module loading. The batcher launches any length its padding rule
allows, so warm-up runs batch 1 and the largest batch at power-of-two lengths across the
profile (arenas grown to the largest shapes, kernels chosen for each length range) while the
device loads: the first request after ``/ready`` is as fast as the hundredth, and a device
revived after a fault is warm before it takes work again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import Manifest
from trtpipe.runners.base import Runner

log = logging.getLogger(__name__)

# Shapes past this many tokens are skipped except the largest batch at its shortest bucket:
# warm-up must not take longer than loading (ONNX Runtime's arena then grows on first use of
# a longer shape, once).
TOKEN_BUDGET = 4096


def warmup_shapes(manifest: Manifest, max_batch_size: int | None = None) -> list[tuple[int, int]]:
    """(batch, sequence) pairs: batch 1 and the largest batch at every power-of-two length."""
    specs = [s for s in manifest.inputs if s.dims[:1] == ["batch"]]
    if not specs or len(specs) != len(manifest.inputs):
        return []
    largest = manifest.max_batch_size
    if max_batch_size:
        largest = min(largest, max_batch_size)
    seq_ranges = [
        (manifest.profile[s.name].min[1], manifest.profile[s.name].max[1])
        for s in specs
        if len(s.dims) == 2 and s.dims[1] == "sequence" and s.name in manifest.profile
    ]
    if not seq_ranges:
        return [(1, 0), (largest, 0)] if largest > 1 else [(1, 0)]
    low = max(r[0] for r in seq_ranges)
    high = min(r[1] for r in seq_ranges)
    buckets = sorted({min(max(length_group(n), low), high) for n in _powers(low, high)})
    shapes = []
    for batch in sorted({1, largest}):
        for seq in buckets:
            if batch * seq <= TOKEN_BUDGET or seq == buckets[0]:
                shapes.append((batch, seq))
    return shapes


def length_group(length: int) -> int:
    """Smallest power of two >= ``length`` (0 stays 0)."""
    return 1 << max(length - 1, 0).bit_length() if length > 0 else 0


def _powers(low: int, high: int) -> list[int]:
    values, n = [], max(1, low)
    while n < high:
        values.append(n)
        n = length_group(n + 1)
    values.append(high)
    return values


def warmup_feeds(manifest: Manifest, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Inputs of one shape: token id 1 everywhere, full attention, zero type ids."""
    feeds = {}
    for spec in manifest.inputs:
        shape = tuple(
            batch if dim == "batch" else seq if dim == "sequence" else max(fixed, 1)
            for fixed, dim in zip(spec.shape, spec.dims, strict=True)
        )
        fill = 0 if spec.name == "token_type_ids" else 1
        feeds[spec.name] = np.full(shape, fill, dtype=spec.dtype)
    return feeds


def warm_up(runner: Runner, manifest: Manifest, shapes: list[tuple[int, int]]) -> float:
    """Run every shape once on a loaded runner; returns the seconds it took."""
    start = time.perf_counter()
    # A runner with several sessions (CPU workers sharing a narrow and a wide one) warms each.
    run = getattr(runner, "warm_every_session", runner.infer)
    for batch, seq in shapes:
        run(warmup_feeds(manifest, batch, seq))
    return time.perf_counter() - start


def warming_factory(
    factory: Callable[[Device], Runner], manifest: Manifest, max_batch_size: int | None
) -> Callable[[Device], Runner]:
    """Wrap a runner factory so every runner it makes is warmed right after it loads."""
    shapes = warmup_shapes(manifest, max_batch_size)

    def make(device: Device) -> Runner:
        runner = factory(device)
        if shapes:
            _warm_after_load(runner, manifest, shapes)
        return runner

    return make


def _warm_after_load(runner: Runner, manifest: Manifest, shapes: list[tuple[int, int]]) -> None:
    load = runner.load

    def load_and_warm() -> None:
        load()
        seconds = warm_up(runner, manifest, shapes)
        log.info("%s warmed %d shapes in %.2f s", runner.describe(), len(shapes), seconds)

    runner.load = load_and_warm  # type: ignore[method-assign]
