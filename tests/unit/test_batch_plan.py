"""The launch plan: the oldest request and its nearest neighbours in length, padding bounded."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trtpipe.runtime.batch_plan import nearest_lengths, padded_length


def launched(lengths: list[int], rows: list[int], picked: list[int], multiple: int = 1) -> int:
    chosen = [lengths[i] for i in picked]
    padded = padded_length(min(chosen), max(chosen), multiple, None)
    return sum(rows[i] for i in picked) * padded


def test_oldest_and_nearest_lengths_within_ten_percent_padding() -> None:
    lengths = [28, 64, 27, 9, 30, 28, 45, 26]
    picked = nearest_lengths(lengths, [1] * 8, max_rows=32, max_padding_share=0.1)
    assert picked == [0, 2, 4, 5, 7]  # 26..30 around the oldest 28; 9, 45, 64 wait
    real = sum(lengths[i] for i in picked)
    assert real / launched(lengths, [1] * 8, picked) == pytest.approx(139 / 150)


def test_rows_never_exceed_the_maximum_and_the_oldest_always_goes() -> None:
    lengths, rows = [50, 50, 50, 50], [3, 2, 2, 1]
    assert nearest_lengths(lengths, rows, max_rows=5, max_padding_share=0.1) == [0, 1]
    # alone it is far from every other length: it still goes, alone
    assert nearest_lengths([3, 100, 100], [1, 1, 1], 8, 0.1) == [0]


def test_zero_padding_share_takes_only_equal_lengths() -> None:
    assert nearest_lengths([7, 8, 7, 6, 7], [1] * 5, 8, 0.0) == [0, 2, 4]


def test_inputs_without_a_sequence_axis_batch_by_rows_alone() -> None:
    assert nearest_lengths([0, 0, 0], [2, 3, 4], 5, 0.0) == [0, 1]


def test_rounded_lengths_share_a_launch_when_rounding_pads_them_anyway() -> None:
    # padded to 8 either way: joining 3, 5 and 6 costs no position more than the 3 alone
    picked = nearest_lengths([3, 5, 60, 6], [1] * 4, 8, 0.5, multiple=8, limit=64)
    assert picked == [0, 1, 3]
    assert padded_length(3, 6, 8, 64) == 8 and padded_length(60, 61, 8, 62) == 62
    assert padded_length(9, 9, 8, None) == 9


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 128), st.integers(1, 4)), min_size=1, max_size=64),
    st.integers(1, 32),
    st.sampled_from([0.0, 0.1, 0.25, 0.5]),
)
def test_any_queue_gives_a_valid_launch(
    queue: list[tuple[int, int]], max_rows: int, share: float
) -> None:
    lengths = [n for n, _ in queue]
    rows = [min(r, max_rows) for _, r in queue]
    picked = nearest_lengths(lengths, rows, max_rows, share)
    assert picked[0] == 0 and picked == sorted(set(picked))
    assert sum(rows[i] for i in picked) <= max_rows
    if len(picked) > 1 and max(lengths[i] for i in picked) > 0:
        padding = 1 - sum(rows[i] * lengths[i] for i in picked) / launched(lengths, rows, picked)
        assert padding <= share + 1e-12
    # what was left out could not have joined: every left-out request of a length inside the
    # launch's range would have added no padding beyond the rule, so none is left there
    inside = [
        i
        for i in range(len(lengths))
        if i not in picked
        and min(lengths[j] for j in picked) < lengths[i] < max(lengths[j] for j in picked)
    ]
    assert not inside or sum(rows[i] for i in picked) + min(rows[i] for i in inside) > max_rows
    assert np.all(np.asarray(lengths)[picked] >= 0)


def test_launch_overhead_stops_growth_once_padding_costs_more_than_it_saves() -> None:
    # MiniLM on one CPU thread: a launch costs about 7 positions besides its positions.
    lengths = [28, 28, 27, 29, 25]
    rows = [1] * 5
    # Padding alone allows all five (5.5% padding) ...
    assert nearest_lengths(lengths, rows, 32, 0.1) == [0, 1, 2, 3, 4]
    # ... but after 28, 28, 27 the 29 would lengthen three rows to save a 7-position launch.
    assert nearest_lengths(lengths, rows, 32, 0.1, launch_overhead=7.0) == [0, 1, 2]
    # A launch that is mostly fixed cost (a GPU) takes all of them, as without the model.
    assert nearest_lengths(lengths, rows, 32, 0.1, launch_overhead=5000.0) == [0, 1, 2, 3, 4]
    # Equal lengths never add padding, so they always share a launch.
    assert nearest_lengths([16] * 6, [1] * 6, 32, 0.1, launch_overhead=0.0) == list(range(6))
