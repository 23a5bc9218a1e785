"""Generation parameters and next-token selection: greedy, temperature, top-k, top-p, seed.

Each prompt row gets its own ``numpy.random.Generator`` seeded with ``(seed, row index)``, so a
seeded run gives the same tokens whatever the batch size or the number of devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trtpipe.errors import InputError


@dataclass
class SamplingParams:
    """What to generate: length, decoding strategy and stop tokens."""

    max_new_tokens: int = 50
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @property
    def is_greedy(self) -> bool:
        """Temperature 0 means greedy too (the OpenAI convention)."""
        return self.greedy or self.temperature == 0

    def validate(self) -> SamplingParams:
        """Raise InputError naming the bad parameter and its allowed range."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max-new-tokens must be an integer >= 1, got {self.max_new_tokens}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top-k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not np.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InputError(f"seed must be an integer >= 0, got {self.seed}")
        return self


def row_generators(seed: int | None, rows: Sequence[int]) -> list[np.random.Generator]:
    """One generator per prompt, keyed by the prompt's index in the whole request."""
    if seed is None:
        return [np.random.default_rng() for _ in rows]
    return [np.random.default_rng([seed, int(row)]) for row in rows]


def filter_logits(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Probabilities [B, V] after temperature, top-k and top-p (nucleus) filtering (HF order)."""
    scores = logits.astype(np.float64) / max(temperature, 1e-6)
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = np.partition(scores, vocab - top_k, axis=-1)[:, vocab - top_k : vocab - top_k + 1]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = softmax(scores)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        cumulative = np.cumsum(sorted_probs, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        remove_sorted = (cumulative - sorted_probs) >= top_p
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        probs = np.where(remove, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class Sampler:
    """Picks the next token of every row from last-position logits [B, V]."""

    def __init__(self, params: SamplingParams, rows: Sequence[int]):
        self.params = params
        self.generators = None if params.is_greedy else row_generators(params.seed, rows)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.generators is None:
            return np.argmax(logits, axis=-1).astype(np.int64)
        p = self.params
        probs = filter_logits(logits, p.temperature, p.top_k, p.top_p)
        choices = np.empty(len(probs), dtype=np.int64)
        for i, (row, rng) in enumerate(zip(probs, self.generators, strict=True)):
            # Inverse-CDF sampling: one uniform draw per row per step, stable across numpy.
            cdf = np.cumsum(row)
            choices[i] = min(
                int(np.searchsorted(cdf, rng.random() * cdf[-1], "right")), len(row) - 1
            )
        return choices
