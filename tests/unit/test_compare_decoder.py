"""The decoder gate's arithmetic on synthetic logits: what counts as an error and what does not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trtpipe.compare_decoder import (
    DecoderTolerances,
    build_report,
    centred_cosine,
    split_texts,
)
from trtpipe.errors import InputError


def logits(seed: int = 0, prompts: int = 4, steps: int = 5, vocab: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(prompts, steps, vocab)) * 3


def test_identical_logits_pass_fp32_with_exact_figures() -> None:
    ref = logits()
    report = build_report(
        ref.copy(), ref, [4, 4, 4, 4], 4, "fp32", DecoderTolerances.for_precision("fp32"), "t"
    )
    assert report.passed
    out = report.outputs["logits"]
    assert out.top1_agreement == 1.0 and out.max_abs == 0.0 and out.rows == 20
    assert [s.step for s in report.steps] == [0, 1, 2, 3, 4]
    assert all(s.positions == 4 and s.cosine_min == pytest.approx(1.0) for s in report.steps)
    assert report.greedy.match_rate == 1.0 and report.greedy.exact == 4
    assert report.disagreement_margin_max is None


def test_a_constant_shift_is_not_an_error_but_a_flipped_argmax_is() -> None:
    ref = logits()
    shifted = ref + 7.0  # softmax ignores it: cosine stays 1, top-1 unchanged
    assert centred_cosine(shifted, ref).min() == pytest.approx(1.0)
    flipped = ref.copy()
    top = int(np.argmax(ref[2, 3]))
    second = int(np.argsort(ref[2, 3])[-2])
    flipped[2, 3, second] = ref[2, 3, top] + 0.5  # one position's winner changes
    tol = DecoderTolerances.for_precision("fp16")
    report = build_report(flipped, ref, [4, 4, 1, 4], 4, "fp16", tol, "t")
    assert report.outputs["logits"].top1_agreement == pytest.approx(19 / 20)
    assert [s.top1_agreement for s in report.steps] == [1.0, 1.0, 1.0, 0.75, 1.0]
    margin = ref[2, 3, top] - ref[2, 3, second]
    assert report.disagreement_margin_max == pytest.approx(margin)
    assert report.greedy.match_rate == pytest.approx(13 / 16)
    assert not report.passed  # 95% < 98%
    assert "top1_agreement 0.9500 < 0.98" in report.table()
    assert "step 1: 1" in report.table()  # where the greedy run diverged


def test_fp32_greedy_divergence_alone_fails_and_json_keeps_the_encoder_schema() -> None:
    ref = logits()
    report = build_report(
        ref.copy(), ref, [4, 2, 4, 4], 4, "fp32", DecoderTolerances.for_precision("fp32"), "t"
    )
    assert not report.passed and report.greedy.failures == ["match_rate 0.8750 < 1"]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["precision"] == "fp32"
    assert set(data["outputs"]) == {"logits"}
    assert {"max_abs", "cosine_min", "cosine_mean", "top1_agreement", "failures"} <= set(
        data["outputs"]["logits"]
    )
    assert data["tolerances"]["greedy_match_min"] == 1.0
    assert len(data["decoder"]["steps"]) == 5
    assert data["decoder"]["greedy"]["first_divergence"] == [4, 2, 4, 4]


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="engine shape"):
        build_report(logits(steps=4), logits(), [1], 4, "fp32", DecoderTolerances(), "t")


class Tokens:
    """Whitespace 'tokenizer': one id per word."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [len(w) for w in text.split()]}


def test_texts_split_into_prompt_and_real_continuation() -> None:
    texts = ["a bb ccc dddd eeeee", "a bb", "one two three four five six seven eight"]
    pairs = split_texts(Tokens(), texts, new_tokens=3, max_prompt=4)
    assert pairs == [([1, 2], [3, 4, 5]), ([3, 3, 5, 4], [4, 3, 5])]  # short text skipped
    with pytest.raises(InputError, match="no text has more than 9 tokens"):
        split_texts(Tokens(), texts, new_tokens=9, max_prompt=4)
