"""What a launch costs the engine: a fixed part plus a part per sequence position, learnt online.

The batcher pads every request of a launch to its longest, so a request of another length is
worth taking only while its padding costs less than the launch overhead it shares. That
overhead depends on the engine and the device: ONNX Runtime running MiniLM on one CPU thread
spends about 0.6 ms per launch besides ~80 us per position, about 8 positions' worth; a GPU
launch is mostly fixed cost. So the batcher fits ``seconds = fixed + per_position x positions``
by least squares over its own recent launches (timed on the device, without queueing), weighting
older launches less, and hands ``fixed / per_position`` to ``batch_plan.nearest_lengths``.
"""

from __future__ import annotations

# Launches it takes for an old launch's weight to halve: long enough to average out the noise
# of a loaded machine, short enough to follow a change of load.
HALF_LIFE_LAUNCHES = 256
# Launches before the fit is used at all, and the least relative spread of their positions.
MIN_LAUNCHES = 32
MIN_RELATIVE_SPREAD = 0.1


class LaunchCostModel:
    """Weighted least squares of launch seconds on launched positions (rows x padded length)."""

    def __init__(self, half_life: int = HALF_LIFE_LAUNCHES, min_launches: int = MIN_LAUNCHES):
        self._decay = 0.5 ** (1.0 / half_life)
        self._min_launches = min_launches
        self.launches = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def record(self, positions: int, seconds: float) -> None:
        """One launch of ``positions`` sequence positions that ran ``seconds`` on its device."""
        if positions <= 0 or seconds <= 0:
            return
        d = self._decay
        x, y = float(positions), seconds
        self._w = self._w * d + 1.0
        self._x = self._x * d + x
        self._y = self._y * d + y
        self._xx = self._xx * d + x * x
        self._xy = self._xy * d + x * y
        self.launches += 1

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per position), or None while the launches cannot tell them
        apart (too few, all about one size, or time not growing with positions)."""
        if self.launches < self._min_launches:
            return None
        mean_x = self._x / self._w
        variance = self._xx / self._w - mean_x * mean_x
        if mean_x <= 0 or variance <= (MIN_RELATIVE_SPREAD * mean_x) ** 2:
            return None
        per_position = (self._xy / self._w - mean_x * self._y / self._w) / variance
        if per_position <= 0:
            return None
        fixed = self._y / self._w - per_position * mean_x
        return max(fixed, 0.0), per_position

    def overhead_positions(self) -> float | None:
        """The fixed cost of a launch in positions' worth of time; None while unknown."""
        fitted = self.fit()
        return None if fitted is None else fitted[0] / fitted[1]
