"""Fixed shapes: the engine and PyTorch eager on identical random batches, interleaved."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from trtpipe.bench.common import SETTLE_S, alternate, timed
from trtpipe.bench.stats import LatencyStats, ratio
from trtpipe.runners.base import Runner

log = logging.getLogger(__name__)


@dataclass
class SideResult:
    """One runner at one shape: per-call latency and the throughput of the median call."""

    latency: LatencyStats
    sequences_per_s: float
    tokens_per_s: float

    @classmethod
    def from_samples(cls, samples: list[float], batch: int, seq: int) -> SideResult:
        latency = LatencyStats.from_seconds(samples)
        per_s = 1000.0 / latency.median_ms
        return cls(latency, batch * per_s, batch * seq * per_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency.to_dict(),
            "sequences_per_s": self.sequences_per_s,
            "tokens_per_s": self.tokens_per_s,
        }


@dataclass
class ShapeResult:
    batch_size: int
    seq_len: int
    engine: SideResult
    baseline: SideResult | None

    @property
    def speedup(self) -> float | None:
        """Engine throughput over baseline throughput (same inputs, same run)."""
        if self.baseline is None:
            return None
        return ratio(self.engine.sequences_per_s, self.baseline.sequences_per_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "engine": self.engine.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "speedup": self.speedup,
        }


def synthetic_feeds(runner: Runner, batch: int, seq: int, vocab: int, seed: int = 0) -> Any:
    """Random token ids in the vocabulary with full attention: every position is real work."""
    from trtpipe.compare import random_feeds

    return random_feeds(runner, batch, seq, vocab, seed)


def bench_shape(
    engine: Runner,
    baseline: Runner | None,
    batch: int,
    seq: int,
    vocab: int,
    runs: int,
    warmup: int,
) -> ShapeResult:
    """Warm both up, then ``runs`` calls each, alternating which side goes first."""
    feeds = synthetic_feeds(engine, batch, seq, vocab)
    sides: list[tuple[str, Runner]] = [("engine", engine)]
    if baseline is not None:
        sides.append(("baseline", baseline))
    for _ in range(warmup):
        for _, runner in sides:
            runner.infer(feeds)
    samples: dict[str, list[float]] = {name: [] for name, _ in sides}
    for _, engine_first in alternate(runs):
        order = sides if engine_first else sides[::-1]
        for name, runner in order:
            seconds, _ = timed(partial(runner.infer, feeds))
            samples[name].append(seconds)
            if len(sides) > 1:
                time.sleep(SETTLE_S)
    result = ShapeResult(
        batch,
        seq,
        SideResult.from_samples(samples["engine"], batch, seq),
        SideResult.from_samples(samples["baseline"], batch, seq) if baseline else None,
    )
    log.info(
        "batch %d x seq %d: engine %.1f seq/s%s",
        batch,
        seq,
        result.engine.sequences_per_s,
        f", baseline {result.baseline.sequences_per_s:.1f} seq/s" if result.baseline else "",
    )
    return result


def bench_fixed(
    engine: Runner,
    baseline: Runner | None,
    batch_sizes: list[int],
    seq_lens: list[int],
    vocab: int,
    runs: int,
    warmup: int,
) -> list[ShapeResult]:
    """Every (batch, seq) pair; both runners must already be loaded."""
    return [
        bench_shape(engine, baseline, batch, seq, vocab, runs, warmup)
        for seq in seq_lens
        for batch in batch_sizes
    ]
