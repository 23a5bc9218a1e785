"""Sampling filters, seeded samplers, parameter checks and left padding (no models needed)."""

from __future__ import annotations

import numpy as np
import pytest

from trtpipe.errors import InputError
from trtpipe.generation.prompts import chunks, deal, left_pad, position_ids
from trtpipe.generation.sampling import Sampler, SamplingParams, filter_logits

LOGITS = np.log(np.array([[0.5, 0.3, 0.1, 0.06, 0.04]], dtype=np.float32))


def test_no_filter_is_softmax() -> None:
    probs = filter_logits(LOGITS, 1.0, 0, 1.0)
    np.testing.assert_allclose(probs[0], [0.5, 0.3, 0.1, 0.06, 0.04], rtol=1e-6)


def test_top_k_keeps_the_k_largest() -> None:
    probs = filter_logits(LOGITS, 1.0, 2, 1.0)
    np.testing.assert_allclose(probs[0], [0.625, 0.375, 0, 0, 0], rtol=1e-6)


def test_top_p_keeps_smallest_prefix_reaching_the_mass() -> None:
    # 0.5 + 0.3 = 0.8 < 0.85, so 0.1 is needed too; 0.06 and 0.04 go.
    probs = filter_logits(LOGITS, 1.0, 0, 0.85)
    np.testing.assert_allclose(probs[0], [0.5 / 0.9, 0.3 / 0.9, 0.1 / 0.9, 0, 0], rtol=1e-6)
    # A tiny top-p still keeps the best token.
    np.testing.assert_allclose(filter_logits(LOGITS, 1.0, 0, 1e-6)[0], [1, 0, 0, 0, 0])


def test_temperature_sharpens_and_flattens() -> None:
    cold = filter_logits(LOGITS, 0.5, 0, 1.0)[0]
    hot = filter_logits(LOGITS, 2.0, 0, 1.0)[0]
    expected_cold = np.array([0.5, 0.3, 0.1, 0.06, 0.04]) ** 2
    np.testing.assert_allclose(cold, expected_cold / expected_cold.sum(), rtol=1e-6)
    assert cold[0] > 0.5 > hot[0]


def test_greedy_is_argmax_and_temperature_zero_is_greedy() -> None:
    logits = np.array([[0.1, 3.0, 2.0], [5.0, -1.0, 4.9]], dtype=np.float32)
    assert Sampler(SamplingParams(greedy=True), [0, 1])(logits).tolist() == [1, 0]
    assert Sampler(SamplingParams(temperature=0.0), [0, 1])(logits).tolist() == [1, 0]


def test_seeded_sampling_is_reproducible_and_keyed_by_prompt_index() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    params = SamplingParams(temperature=1.0, seed=11)

    def draws(rows: list[int], table: np.ndarray) -> np.ndarray:
        sampler = Sampler(params, rows)
        return np.stack([sampler(table) for _ in range(20)], axis=1)

    first = draws([0, 1, 2], logits)
    np.testing.assert_array_equal(first, draws([0, 1, 2], logits))
    # Prompt 1 alone (as in a batch of one) draws what it drew inside the batch of three.
    np.testing.assert_array_equal(first[1:2], draws([1], logits[1:2]))
    params = SamplingParams(temperature=1.0, seed=12)
    assert not np.array_equal(first, draws([0, 1, 2], logits))


def test_sampling_follows_the_distribution() -> None:
    probs = np.array([0.7, 0.2, 0.1])
    logits = np.log(np.tile(probs, (1, 1))).astype(np.float32)
    sampler = Sampler(SamplingParams(seed=3), [0])
    counts = np.bincount([int(sampler(logits)[0]) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, probs, atol=0.03)
    top1 = Sampler(SamplingParams(seed=3, top_k=1), [0])
    assert {int(top1(logits)[0]) for _ in range(50)} == {0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_p": 1.5}, "top-p must be in \\(0, 1\\]"),
        ({"top_p": 0.0}, "top-p must be in \\(0, 1\\]"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_k": -1}, "top-k must be an integer >= 0"),
        ({"max_new_tokens": 0}, "max-new-tokens must be an integer >= 1"),
        ({"seed": -3}, "seed must be an integer >= 0"),
    ],
)
def test_bad_parameters_raise_input_error(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        SamplingParams(**kwargs).validate()


def test_left_padding_and_positions_follow_hf() -> None:
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [1, 1, 0]]
    assert ids.dtype == np.int64 and mask.dtype == np.int64


def test_chunks_and_round_robin_deal() -> None:
    assert chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert deal(5, 2) == [[0, 2, 4], [1, 3]]
    assert deal(1, 3) == [[0], [], []]
    with pytest.raises(InputError):
        chunks([1], 0)
