"""The batcher's launch cost model: fixed + per-position seconds, fitted from its launches."""

from __future__ import annotations

import numpy as np
import pytest

from trtpipe.runtime.launch_cost import LaunchCostModel


def test_fit_recovers_the_fixed_and_per_position_cost() -> None:
    model = LaunchCostModel()
    rng = np.random.default_rng(0)
    for positions in rng.integers(10, 400, size=200):
        noise = rng.normal(1.0, 0.02)  # a loaded machine: +-2% per launch
        model.record(int(positions), (0.6e-3 + 80e-6 * int(positions)) * noise)
    fitted = model.fit()
    assert fitted is not None
    fixed, per_position = fitted
    assert fixed == pytest.approx(0.6e-3, rel=0.15)
    assert per_position == pytest.approx(80e-6, rel=0.05)
    assert model.overhead_positions() == pytest.approx(7.5, rel=0.2)


def test_unknown_until_launches_tell_fixed_from_per_position_cost() -> None:
    model = LaunchCostModel(min_launches=8)
    for _ in range(7):
        model.record(100, 0.01)
    assert model.overhead_positions() is None  # too few launches
    for _ in range(50):
        model.record(100, 0.01)
    assert model.overhead_positions() is None  # all one size: no slope to fit
    falling = LaunchCostModel(min_launches=8)
    for positions in range(10, 400, 10):
        falling.record(positions, 0.05 - 1e-4 * positions)
    assert falling.overhead_positions() is None  # time not growing with positions
    idle = LaunchCostModel(min_launches=1)
    idle.record(0, 0.01)  # a launch without a sequence axis carries nothing to fit
    idle.record(10, 0.0)
    assert idle.launches == 0


def test_old_launches_are_forgotten() -> None:
    model = LaunchCostModel(half_life=64)
    for positions in range(10, 410):  # a GPU-like engine: the launch is mostly fixed cost
        model.record(positions, 5e-3 + 1e-6 * positions)
    assert model.overhead_positions() == pytest.approx(5000, rel=0.01)
    for positions in list(range(10, 410)) * 3:  # then a CPU-like one
        model.record(positions, 0.6e-3 + 80e-6 * positions)
    assert model.overhead_positions() == pytest.approx(7.5, rel=0.05)
