"""Continuous batching without a model: cache joins, admission arithmetic, step feeds,
per-request sampling, stop strings and logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from trtpipe.errors import InputError
from trtpipe.generation.batch_state import Row, RunningBatch, join_caches
from trtpipe.generation.sampling import Sampler, SamplingParams
from trtpipe.generation.sequence import QueueSink, Sequence, stop_strings, token_logprobs


def chars(ids: list[int]) -> str:
    """A toy detokenizer: token i is the character chr(i)."""
    return "".join(chr(i) for i in ids)


def seq(prompt_len: int, max_new: int, **kwargs: object) -> Sequence:
    params = SamplingParams(max_new, greedy=True)
    return Sequence(list(range(1, prompt_len + 1)), params, QueueSink(), chars, **kwargs)  # type: ignore[arg-type]


def cache(rows: int, width: int, start: int) -> np.ndarray:
    """[rows, 1 head, width, 1] with distinct values per row and column."""
    values = start + np.arange(rows * width, dtype=np.float32).reshape(rows, 1, width, 1)
    return values


def test_join_caches_right_aligns_compacts_and_left_pads() -> None:
    old = [cache(3, 5, 100)]  # rows 0..2, width 5
    new = [cache(2, 2, 900)]  # two prefilled rows, width 2
    merged = join_caches(old, [0, 2], new, [1], width=3)[0]
    assert merged.shape == (3, 1, 3, 1)
    # Old rows keep their last 3 columns (the dropped leading ones are padding by contract).
    np.testing.assert_array_equal(merged[0, 0, :, 0], old[0][0, 0, 2:, 0])
    np.testing.assert_array_equal(merged[1, 0, :, 0], old[0][2, 0, 2:, 0])
    # The new row is right-aligned with one zero column of left padding.
    np.testing.assert_array_equal(merged[2, 0, :, 0], [0, *new[0][1, 0, :, 0]])


def test_join_caches_only_new_rows() -> None:
    new = [cache(2, 4, 0), cache(2, 4, 50)]
    merged = join_caches(None, [], new, [1], width=4)
    assert [m.shape for m in merged] == [(1, 1, 4, 1), (1, 1, 4, 1)]
    np.testing.assert_array_equal(merged[1][0], new[1][1])


def test_fits_checks_batch_and_length_for_every_row() -> None:
    batch = RunningBatch(max_batch=2, max_total=20, pad_id=0)
    running = seq(6, 10)
    running.token_ids = [7, 8, 9]  # 7 tokens still to come
    batch.rows = [Row(running, length=8, pending=9)]
    batch.width = 8
    # width max(8, 5) + max(7, 4 - 1) = 15 <= 19
    assert batch.fits([seq(5, 4)])
    # a 12-token prompt makes the width 12: 12 + 7 = 19 still fits, 13 does not
    assert batch.fits([seq(12, 2)])
    assert not batch.fits([seq(13, 2)])
    # a joining row that needs 12 more tokens after its prefill: 8 + 12 = 20 > 19
    assert not batch.fits([seq(3, 13)])
    # batch maximum
    assert not batch.fits([seq(2, 2), seq(2, 2)])
    # a dead row does not count against the batch or the length
    batch.rows[0].live = False
    assert batch.fits([seq(2, 2), seq(2, 2)])


def test_step_feeds_mask_and_positions_per_row() -> None:
    batch = RunningBatch(max_batch=4, max_total=64, pad_id=0)
    a, b = seq(2, 5), seq(4, 5)
    batch.rows = [Row(a, length=2, pending=11), Row(b, length=4, pending=22, live=False)]
    batch.width = 4
    ids, mask, positions = batch.step_feeds()
    assert ids.tolist() == [[11], [0]]  # a dead row is fed the pad token
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert positions.tolist() == [[2], [4]]
    batch.advance()
    assert batch.width == 5 and [r.length for r in batch.rows] == [3, 5]


def test_sequence_sampling_matches_the_offline_sampler_for_its_index() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 40)).astype(np.float32)
    params = SamplingParams(6, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    offline = Sampler(params, [0, 3])
    expected = [offline(np.stack([row, row]))[1] for row in logits]
    request = Sequence([1], params, QueueSink(), chars, index=3)
    assert [request.choose(row) for row in logits] == expected


def test_stop_string_cuts_text_and_holds_back_a_possible_prefix() -> None:
    sink = QueueSink()
    request = Sequence([1], SamplingParams(20, greedy=True), sink, chars, stop=("END",))
    logits = np.zeros(200, dtype=np.float32)
    finished = [request.accept(ord(c), logits) for c in "abEN"]
    pieces = [e.text for e in list_events(sink)]
    assert finished == [False] * 4
    assert pieces == ["a", "b", "", ""]  # "E", "EN" could start "END"
    assert request.accept(ord("D"), logits)
    last = list_events(sink)[-1]
    assert (last.text, last.finish_reason, request.text) == ("", "stop", "ab")


def test_held_back_text_is_released_when_it_stops_matching() -> None:
    sink = QueueSink()
    request = Sequence([1], SamplingParams(3, greedy=True), sink, chars, stop=("xyz",))
    logits = np.zeros(200, dtype=np.float32)
    request.accept(ord("x"), logits)
    request.accept(ord("y"), logits)
    assert request.accept(ord("q"), logits)  # max tokens
    events = list_events(sink)
    assert [e.text for e in events] == ["", "", "xyq"]
    assert events[-1].finish_reason == "length" and request.text == "xyq"


def test_eos_finishes_with_stop() -> None:
    sink = QueueSink()
    request = Sequence([1], SamplingParams(9, greedy=True), sink, chars, eos_ids=frozenset({2}))
    assert request.accept(2, np.zeros(10, dtype=np.float32))
    assert list_events(sink)[-1].finish_reason == "stop"


def test_logprobs_are_the_log_softmax_and_top_n_sorted() -> None:
    logits = np.log(np.array([0.1, 0.6, 0.3], dtype=np.float64)).astype(np.float32)
    chosen, top = token_logprobs(logits, 2, 2)
    assert chosen == pytest.approx(np.log(0.3), abs=1e-6)
    assert [t for t, _ in top] == [1, 2]
    assert top[0][1] == pytest.approx(np.log(0.6), abs=1e-6)


def test_stop_field_validation() -> None:
    assert stop_strings(None) == ()
    assert stop_strings("\n") == ("\n",)
    assert stop_strings(["a", "b"]) == ("a", "b")
    for bad in ([""], 3, ["a"] * 5, [1]):
        with pytest.raises(InputError):
            stop_strings(bad)


def list_events(sink: QueueSink) -> list:
    items = []
    while not sink.queue.empty():
        items.append(sink.queue.get())
    return items


def test_latency_histogram_buckets_are_cumulative_and_merge() -> None:
    from trtpipe.generation.histogram import LatencyHistogram

    a, b = LatencyHistogram(), LatencyHistogram()
    for seconds in (0.0005, 0.001, 0.02, 40.0):
        a.observe(seconds)
    b.observe(0.02)
    merged = a.merge(b)
    buckets = dict(merged.cumulative())
    assert buckets["0.001"] == 2  # le 1 ms includes 1 ms itself
    assert buckets["0.025"] == 4 and buckets["30.0"] == 4 and buckets["+Inf"] == 5
    assert merged.count == 5 and merged.total == pytest.approx(40.0415)
    assert a.count == 4  # merging leaves the parts alone
