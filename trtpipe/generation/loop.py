"""The generation loop: prefill, then one decode step per token, for one left-padded batch."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from trtpipe.errors import InputError
from trtpipe.generation.kv_cache import DecoderSession, DecoderSpec
from trtpipe.generation.prompts import left_pad, position_ids
from trtpipe.generation.sampling import Sampler, SamplingParams


@dataclass
class SequenceResult:
    """One prompt's generated ids (EOS included when hit, no padding after it)."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


@dataclass
class StepEvent:
    """What one decode step produced: the token of every row still running."""

    step: int
    tokens: dict[int, int]
    finished: set[int]
    elapsed_s: float


def check_limits(spec: DecoderSpec, rows: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Refuse a batch the engine's profile cannot hold, before any work is done."""
    width = max(len(r) for r in rows)
    if len(rows) > spec.max_batch:
        raise InputError(
            f"batch of {len(rows)} prompts exceeds the engine's maximum batch {spec.max_batch}; "
            "lower --batch-size"
        )
    if width > spec.max_prompt:
        raise InputError(
            f"prompt of {width} tokens is longer than the engine allows ({spec.max_prompt}); "
            "shorten it or rebuild with a larger --max-shapes"
        )
    if width + max_new_tokens > spec.max_total:
        raise InputError(
            f"prompt of {width} tokens + max-new-tokens {max_new_tokens} exceeds the engine's "
            f"total length {spec.max_total}; use max-new-tokens <= {spec.max_total - width}"
        )


def iterate_batch(
    session: DecoderSession,
    rows: Sequence[Sequence[int]],
    indices: Sequence[int],
    params: SamplingParams,
    stop_ids: set[int],
    pad_id: int,
    results: list[SequenceResult],
) -> Iterator[StepEvent]:
    """Generate for ``rows``; yield after every step; fill ``results`` (one per row) as it goes.

    Finished rows keep running with the pad token (their output ignores it) until every row has
    stopped or max_new_tokens is reached, as HF ``generate`` does.
    """
    check_limits(session.spec, rows, params.max_new_tokens)
    start = time.perf_counter()
    input_ids, mask = left_pad(rows, pad_id)
    batch = len(rows)
    results[:] = [SequenceResult(int(i), list(r)) for i, r in zip(indices, rows, strict=True)]
    sampler = Sampler(params, indices)
    if params.ignore_eos:
        stops: set[int] = set()
    elif params.stop_token_ids is not None:
        stops = {int(t) for t in params.stop_token_ids}
    else:
        stops = stop_ids
    session.start(batch)
    logits = session.step(input_ids, mask, position_ids(mask))
    finished = np.zeros(batch, dtype=bool)
    for step in range(params.max_new_tokens):
        chosen = sampler(logits)
        chosen = np.where(finished, pad_id, chosen)
        emitted: dict[int, int] = {}
        for row in np.flatnonzero(~finished):
            token = int(chosen[row])
            results[row].token_ids.append(token)
            emitted[int(row)] = token
            if token in stops:
                finished[row] = True
                results[row].finish_reason = "stop"
        done = {int(r) for r in np.flatnonzero(finished)}
        yield StepEvent(step, emitted, done, time.perf_counter() - start)
        if finished.all() or step == params.max_new_tokens - 1:
            return
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
        positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        logits = session.step(chosen[:, None].astype(np.int64), mask, positions)
