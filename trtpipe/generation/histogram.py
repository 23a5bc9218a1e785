"""A small latency histogram (Prometheus buckets) the scheduler thread fills without locks.

The server's metrics read it at scrape time; one ``observe`` is a bisect and two additions, cheap
enough for every token of every row.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Seconds: 1 ms .. 30 s, the range of time to first token and inter-token latency.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class LatencyHistogram:
    """Counts per upper bound (the last slot is +Inf), their sum and count."""

    bounds: tuple[float, ...] = BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, ending with +Inf, as Prometheus exposes them."""
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        merged = LatencyHistogram(self.bounds, list(self.counts), self.total, self.count)
        for i, count in enumerate(other.counts):
            merged.counts[i] += count
        merged.total += other.total
        merged.count += other.count
        return merged
