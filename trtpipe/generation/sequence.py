"""One generation request as the scheduler sees it: its own sampler, text, stop checks, events.

A ``Sequence`` is created by the caller (server route, test), handed to ``Scheduler.submit``
and from then on touched only by the scheduler's thread, except ``cancel()``. Every produced
token becomes a ``TokenEvent`` put into the caller's ``EventSink``; the last one carries the
finish reason. Sampling state is per request (one random generator seeded with
``(seed, index)``, as the offline ``Sampler`` does for prompt ``index``), so a seeded request
draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from trtpipe.generation.sampling import SamplingParams, filter_logits


@dataclass
class TokenEvent:
    """One generated token: its id, the new text it completes, logprobs, and maybe the end."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length"


class EventSink(Protocol):
    """Where a sequence's events go: ``TokenEvent`` objects, or an exception that ends it."""

    def put(self, item: TokenEvent | BaseException) -> None: ...


class QueueSink:
    """A thread-safe queue of events with a blocking iterator (tests, offline callers)."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[TokenEvent | BaseException] = queue.SimpleQueue()

    def put(self, item: TokenEvent | BaseException) -> None:
        self.queue.put(item)

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Events until the finishing one; an exception put by the scheduler is raised."""
        while True:
            item = self.queue.get(timeout=timeout)
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class IncrementalText:
    """Text of a growing token list, one piece per token (TGI's prefix/read offsets).

    Decoding only a short window per token keeps the cost flat; a piece ending in an
    incomplete multi-byte character is held back until the character is complete.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.prefix = 0
        self.read = 0

    def push(self, ids: list[int]) -> str:
        before = self.decode(ids[self.prefix : self.read])
        after = self.decode(ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(ids)
            return after[len(before) :]
        return ""

    def flush(self, ids: list[int]) -> str:
        """Whatever is still held back at the end (an incomplete character stays as is)."""
        before = self.decode(ids[self.prefix : self.read])
        after = self.decode(ids[self.prefix :])
        self.prefix = self.read = len(ids)
        return after[len(before) :]


@dataclass(eq=False)
class Sequence:
    """A prompt, how to continue it, and where the tokens go (see the module docstring)."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: EventSink
    decode: Callable[[list[int]], str]
    eos_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-n alternatives per token (0 = only the chosen one)
    index: int = 0  # keys the random generator, as the prompt index does offline
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    gap: float | None = None

    def __post_init__(self) -> None:
        self.cancelled = False  # set by the caller's thread, read by the scheduler's
        self._text = IncrementalText(self.decode)
        self._sent = 0
        self._rng: np.random.Generator | None = None
        if not self.params.is_greedy:
            seed = self.params.seed
            rng_seed: Any = None if seed is None else [seed, int(self.index)]
            self._rng = np.random.default_rng(rng_seed)
        if self.params.ignore_eos:
            self._stop_ids: frozenset[int] = frozenset()
        elif self.params.stop_token_ids is not None:
            self._stop_ids = frozenset(int(t) for t in self.params.stop_token_ids)
        else:
            self._stop_ids = self.eos_ids
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    # -- caller side ---------------------------------------------------------------------------
    def cancel(self) -> None:
        """The client went away: the scheduler retires the row before its next step."""
        self.cancelled = True

    @property
    def remaining(self) -> int:
        """Tokens this sequence may still produce."""
        return self.params.max_new_tokens - len(self.token_ids)

    # -- scheduler side ------------------------------------------------------------------------
    def choose(self, logits: np.ndarray, best: int | None = None) -> int:
        """The next token from this row's last-position logits [V] (the offline Sampler's draw);
        ``best``: the row's argmax when the caller computed it for the whole batch."""
        if self._rng is None:
            return int(np.argmax(logits)) if best is None else best
        p = self.params
        probs = filter_logits(logits[None, :], p.temperature, p.top_k, p.top_p)[0]
        cdf = np.cumsum(probs)
        return min(int(np.searchsorted(cdf, self._rng.random() * cdf[-1], "right")), len(cdf) - 1)

    def accept(self, token: int, logits: np.ndarray) -> bool:
        """Record ``token``, emit its event; True when the sequence has finished."""
        now = time.monotonic()
        # Seconds since this sequence's previous token (None for its first one).
        self.gap = None if self.first_token_at is None else now - self.last_token_at
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.token_ids.append(token)
        finish: str | None = None
        if token in self._stop_ids:
            finish = "stop"
        elif self.remaining <= 0:
            finish = "length"
        self.text += self._text.push(self.token_ids)
        if finish is not None:
            self.text += self._text.flush(self.token_ids)
        cut = self._find_stop()
        if cut is not None:
            self.text = self.text[:cut]
            finish = "stop"
        # Until the end, hold back a tail that may still grow into a stop string.
        end = len(self.text) - (0 if finish is not None else self._held_back())
        piece = self.text[self._sent : max(end, self._sent)]
        self._sent = max(end, self._sent)
        self.finish_reason = finish
        event = TokenEvent(token, piece, finish_reason=finish)
        if self.logprobs is not None:
            event.logprob, event.top_logprobs = token_logprobs(logits, token, self.logprobs)
        self.sink.put(event)
        return finish is not None

    def fail(self, error: BaseException) -> None:
        self.finish_reason = "error"
        self.sink.put(error)

    def _find_stop(self) -> int | None:
        if not self.stop:
            return None
        start = max(0, self._sent - self._longest_stop)
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for size in range(min(self._longest_stop - 1, len(self.text) - self._sent), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0


def token_logprobs(
    logits: np.ndarray, token: int, top: int
) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token`` under the model's distribution and the ``top`` best."""
    scores = logits.astype(np.float64)
    shifted = scores - scores.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    best: list[tuple[int, float]] = []
    if top > 0:
        count = min(top, len(logp))
        ids = np.argpartition(-logp, count - 1)[:count]
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        best = [(int(i), float(logp[i])) for i in ids]
    return float(logp[token]), best


def stop_strings(value: Any) -> tuple[str, ...]:
    """The OpenAI ``stop`` field (a string, a list of up to 4 strings, or null)."""
    from trtpipe.errors import InputError

    if value is None:
        return ()
    items: Seq[Any] = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise InputError('"stop" must be a non-empty string or a list of non-empty strings')
    if len(items) > 4:
        raise InputError(f'"stop" takes at most 4 sequences, got {len(items)}')
    return tuple(items)
