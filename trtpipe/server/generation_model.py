"""A served text-generation model: one continuous-batching scheduler per device.

``ServedGeneration`` owns a loaded ``Generator`` (tokenizer, special ids, one decoder session per
device) and puts a ``Scheduler`` on each session, so concurrent requests share decode steps
instead of each holding a device. Requests go to the least loaded device; the ``n`` choices of
one request go to the same device together. Events come back to the event loop through
``AsyncSink`` (one ``call_soon_threadsafe`` per token).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import asdict
from typing import Any

from trtpipe.errors import InputError
from trtpipe.generation.generator import Generator
from trtpipe.generation.sampling import SamplingParams
from trtpipe.generation.scheduler import Scheduler, SchedulerConfig, SchedulerStats
from trtpipe.generation.sequence import Sequence, TokenEvent

log = logging.getLogger(__name__)


class AsyncSink:
    """Events of several sequences for one asyncio consumer, tagged with the choice index.

    The scheduler thread appends to a deque and wakes the loop only when the consumer is not
    already due to look, so a consumer that falls behind receives a burst in one wake-up
    (and the routes write it as one chunk) instead of one loop callback per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.pending: deque[tuple[int, TokenEvent | BaseException]] = deque()
        self._ready = asyncio.Event()
        self._armed = False

    def tagged(self, index: int) -> _TaggedSink:
        return _TaggedSink(self, index)

    def put_tagged(self, index: int, item: TokenEvent | BaseException) -> None:
        """Any thread: queue an event (the loop is woken once per burst)."""
        self.pending.append((index, item))
        if not self._armed:
            self._armed = True
            self.loop.call_soon_threadsafe(self._ready.set)

    async def bursts(self, count: int) -> AsyncIterator[list[tuple[int, TokenEvent]]]:
        """Lists of (choice index, event) as they arrive, until ``count`` sequences finish."""
        open_ = count
        while open_:
            if not self.pending:
                await self._ready.wait()
                self._ready.clear()
                self._armed = False  # before looking again, so a new event re-arms
                continue
            burst: list[tuple[int, TokenEvent]] = []
            while self.pending and open_:
                index, item = self.pending.popleft()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    open_ -= 1
                burst.append((index, item))
            yield burst

    async def events(self, count: int) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) until all ``count`` sequences have finished."""
        async for burst in self.bursts(count):
            for entry in burst:
                yield entry


class _TaggedSink:
    def __init__(self, shared: AsyncSink, index: int):
        self.shared, self.index = shared, index

    def put(self, item: TokenEvent | BaseException) -> None:
        self.shared.put_tagged(self.index, item)


class ServedGeneration:
    """A decoder engine behind the generation endpoints (see the module docstring)."""

    def __init__(self, generator: Generator, config: SchedulerConfig | None = None):
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.spec = generator.spec
        self.eos_ids = frozenset(generator.stop_ids)
        self.schedulers = [
            Scheduler(session, generator.pad_id, config, name=f"generate@{session.device}")
            for session in generator.sessions
        ]
        for scheduler in self.schedulers:
            scheduler.start()
        self.closed = False

    @classmethod
    def load(
        cls, engine: Any, devices: Seq[Any] | None = None, config: SchedulerConfig | None = None
    ) -> ServedGeneration:
        return cls(Generator(engine, devices), config)

    # -- requests ------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        """Prompt ids as ``tokenizer(prompt)`` gives them; through the fast tokenizer's Rust
        ``encode`` when no padding/truncation is set on it (the wrapper costs more than that)."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and backend.padding is None and backend.truncation is None:
            ids = list(backend.encode(prompt, add_special_tokens=True).ids)
        else:
            ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if not ids:
            raise InputError("the prompt tokenizes to nothing; give some text")
        return ids

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokenizer's chat template, applied as HF applies it (with the generation prompt)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(
                "this model's tokenizer has no chat template; use /v1/completions with a "
                "plain prompt, or add a chat_template to tokenizer_config.json"
            )
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:  # jinja errors: a template rejecting these messages
            raise InputError(f"the chat template rejected the messages: {exc}") from exc
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: AsyncSink,
        n: int = 1,
        stop: tuple[str, ...] = (),
        logprobs: int | None = None,
    ) -> list[Sequence]:
        """``n`` sequences of one prompt (choice i seeded with ``(seed, i)``) on one device."""
        seqs = [
            Sequence(
                list(prompt_ids),
                params,
                sink.tagged(i),
                self.generator.decode,
                self.eos_ids,
                stop=stop,
                logprobs=logprobs,
                index=i,
            )
            for i in range(n)
        ]
        scheduler = min(self.schedulers, key=lambda s: s.load())
        scheduler.submit(*seqs)
        return seqs

    # -- state ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return not self.closed and bool(self.schedulers)

    def stats(self) -> dict[str, int]:
        """Counters summed over devices, plus running / waiting sequences and slots held."""
        total: dict[str, int] = dict.fromkeys(asdict(SchedulerStats()), 0)
        for scheduler in self.schedulers:
            for key, value in asdict(scheduler.stats).items():
                total[key] = max(total[key], value) if key == "peak_rows" else total[key] + value
        total["running"] = sum(s.running for s in self.schedulers)
        total["waiting"] = sum(s.waiting for s in self.schedulers)
        total["slots_in_use"] = sum(s.slots_in_use for s in self.schedulers)
        total["slots"] = sum(s.max_batch for s in self.schedulers)
        return total

    def drain(self, timeout: float | None = None) -> None:
        """Refuse new requests (503) and let running sequences finish."""
        for scheduler in self.schedulers:
            scheduler.stop(drain=True, timeout=timeout)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for scheduler in self.schedulers:
            scheduler.stop(drain=False, timeout=10)
        self.generator.close()
