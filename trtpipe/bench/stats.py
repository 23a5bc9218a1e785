"""Latency statistics: median and percentiles of timed runs (linear interpolation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from trtpipe.errors import InputError


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not len(values):
        raise InputError("no timed runs to summarize; use --runs 1 or more")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


@dataclass
class LatencyStats:
    """Per-call latency in milliseconds over ``n`` timed calls."""

    n: int
    mean_ms: float
    median_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> LatencyStats:
        ms = [1000.0 * s for s in samples]
        p50 = percentile(ms, 50)
        return cls(
            n=len(ms),
            mean_ms=float(np.mean(ms)),
            median_ms=p50,
            p50_ms=p50,
            p90_ms=percentile(ms, 90),
            p99_ms=percentile(ms, 99),
            min_ms=min(ms),
            max_ms=max(ms),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, ``None`` when the denominator is missing or zero."""
    if not denominator:
        return None
    return numerator / denominator
