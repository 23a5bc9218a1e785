"""Prompts -> left-padded batches (HF conventions), batch chunks and their deal across devices."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from trtpipe.engine import TensorSpec
from trtpipe.errors import InputError

T = TypeVar("T")


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids per prompt, no padding; an empty prompt is an error (nothing to condition on)."""
    if not prompts:
        raise InputError("no prompts given")
    ids = [list(tokenizer(text, add_special_tokens=True)["input_ids"]) for text in prompts]
    for index, row in enumerate(ids):
        if not row:
            raise InputError(f"prompt {index} tokenizes to nothing; give some text")
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [B, S] with padding on the LEFT (mask 0 there)."""
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = row
            mask[i, width - len(row) :] = 1
    return input_ids, mask


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Positions counted over real tokens only; padded slots get 1 (as HF generate does)."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


def chunks(items: Sequence[T], size: int) -> list[list[T]]:
    if size < 1:
        raise InputError(f"batch size must be >= 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def deal(count: int, workers: int) -> list[list[int]]:
    """Round-robin: chunk i goes to worker i % workers (the multi-device recipe)."""
    return [list(range(w, count, workers)) for w in range(workers)]


def decoder_feeds(
    tokenizer: Any, texts: Sequence[str], inputs: list[TensorSpec], max_length: int
) -> dict[str, np.ndarray]:
    """Prefill feeds (past length 0) for a decoder engine, e.g. as calibration data."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [r[:max_length] for r in tokenize(tokenizer, texts)]
    input_ids, mask = left_pad(rows, pad)
    batch = input_ids.shape[0]
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name == "input_ids":
            feeds[spec.name] = input_ids.astype(spec.dtype)
        elif spec.name == "attention_mask":
            feeds[spec.name] = mask.astype(spec.dtype)
        elif spec.name == "position_ids":
            feeds[spec.name] = position_ids(mask).astype(spec.dtype)
        elif spec.name.startswith("past_key_values"):
            heads, head_dim = spec.shape[1], spec.shape[3]
            feeds[spec.name] = np.zeros((batch, heads, 0, head_dim), dtype=spec.dtype)
        else:
            raise InputError(f"cannot make decoder input {spec.name!r} from text")
    return feeds
