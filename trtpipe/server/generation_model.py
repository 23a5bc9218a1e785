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
from trtpipe.generation.histogram import LatencyHistogram
from trtpipe.generation.sampling import SamplingParams
from trtpipe.generation.scheduler import Scheduler, SchedulerConfig, SchedulerStats
from trtpipe.generation.sequence import Sequence, TokenEvent
from trtpipe.server.errors import ModelNotReadyError
from trtpipe.server.generation_tensors import tensor_documents

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


def text_tensors() -> dict[str, list[dict[str, Any]]]:
    """The v2 infer tensors, Triton's TensorRT-LLM backend names (text in, text out), without
    the batch dim (trtpipe.server.generation_tensors lists them)."""
    return tensor_documents()


class ServedGeneration:
    """A decoder engine behind the generation endpoints (see the module docstring)."""

    version = "1"

    def __init__(
        self,
        generator: Generator,
        config: SchedulerConfig | None = None,
        name: str = "",
    ):
        self.name = name or generator.engine.path.name
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
        # Set by ``drain``: why new requests are refused (503 / UNAVAILABLE).
        self.refusing: str | None = None

    @classmethod
    def load(
        cls,
        name: str,
        engine: Any,
        devices: Seq[Any] | None = None,
        config: SchedulerConfig | None = None,
        threads: int | None = None,
    ) -> ServedGeneration:
        return cls(Generator(engine, devices, threads), config, name)

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
        if self.refusing is not None:
            raise ModelNotReadyError(self.refusing)
        scheduler = min(self.schedulers, key=lambda s: s.load())
        scheduler.submit(*seqs)
        return seqs

    # -- state and Triton documents -------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return (
            not self.closed
            and self.refusing is None
            and bool(self.schedulers)
            and all(s.accepting for s in self.schedulers)
        )

    def devices_status(self) -> list[dict[str, Any]]:
        return [
            {
                "device": str(s.session.device),
                "healthy": s.accepting,
                "running": s.running,
                "waiting": s.waiting,
            }
            for s in self.schedulers
        ]

    def metadata(self) -> dict[str, Any]:
        manifest = self.generator.engine.manifest
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": f"trtpipe_generation_{manifest.backend}",
            **{
                kind: [
                    {"name": t["name"], "datatype": t["datatype"], "shape": [-1, *t["shape"]]}
                    for t in tensors
                ]
                for kind, tensors in text_tensors().items()
            },
            "parameters": {
                "task": manifest.task,
                "max_total_tokens": self.spec.max_total,
                "max_prompt_tokens": self.spec.max_prompt,
                "endpoints": [
                    f"/v2/models/{self.name}/generate",
                    f"/v2/models/{self.name}/generate_stream",
                    f"/v2/models/{self.name}/infer",
                    "/v1/completions",
                    "/v1/chat/completions",
                ],
            },
        }

    def model_config(self) -> dict[str, Any]:
        manifest = self.generator.engine.manifest
        first = self.schedulers[0].config if self.schedulers else SchedulerConfig()
        return {
            "name": self.name,
            "platform": f"trtpipe_generation_{manifest.backend}",
            "backend": manifest.backend,
            "max_batch_size": max((s.max_batch for s in self.schedulers), default=0),
            "input": [
                {
                    "name": t["name"],
                    "data_type": f"TYPE_{t['datatype']}",
                    "dims": t["shape"],
                    "optional": t["optional"],
                }
                for t in text_tensors()["inputs"]
            ],
            "output": [
                {"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"]}
                for t in text_tensors()["outputs"]
            ],
            # Tokens stream back as they are made (Triton's decoupled mode).
            "model_transaction_policy": {"decoupled": True},
            "dynamic_batching": {
                "default_queue_policy": {
                    "timeout_action": "REJECT",
                    "default_timeout_microseconds": int((first.timeout_s or 0) * 1e6),
                    "max_queue_size": first.max_queue_size,
                }
            },
            "instance_group": [
                {"name": f"{self.name}_{s.session.device}", "count": 1} for s in self.schedulers
            ],
            "parameters": {
                "precision": {"string_value": manifest.precision},
                "task": {"string_value": manifest.task},
                # Iteration-level batching (a parameter: Triton's scheduling fields are a oneof).
                "continuous_batching": {"string_value": "true"},
            },
        }

    def statistics(self) -> dict[str, Any]:
        counts = self.stats()
        return {
            "name": self.name,
            "version": self.version,
            "inference_count": counts["finished"],
            "execution_count": counts["steps"] + counts["prefills"],
            "generation_stats": counts,
        }

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

    def histogram(self, kind: str) -> LatencyHistogram:
        """``ttft`` or ``itl`` over every device."""
        merged = LatencyHistogram()
        for scheduler in self.schedulers:
            merged = merged.merge(getattr(scheduler, kind))
        return merged

    def drain(self, timeout: float | None = None, reason: str | None = None) -> None:
        """Refuse new requests at once (503, with ``reason``); then each device refuses its
        queue and lets its running sequences finish."""
        self.refusing = reason or f"model {self.name!r} is shutting down; retry elsewhere"
        for scheduler in self.schedulers:
            scheduler.stop(drain=True, timeout=timeout)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for scheduler in self.schedulers:
            scheduler.stop(drain=False, timeout=10)
        self.generator.close()
