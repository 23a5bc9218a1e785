"""``Generator``: an engine dir loaded on one or more devices, texts in, texts out.

Prompts are cut into ``batch_size`` chunks and the chunks dealt round-robin to one decoder
session per device, each driven by its own thread (the common multi-GPU recipe).
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Generator as Stream
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError
from trtpipe.generation.kv_cache import DecoderSession
from trtpipe.generation.loop import SequenceResult, iterate_batch
from trtpipe.generation.prompts import chunks, deal, tokenize
from trtpipe.generation.sampling import SamplingParams
from trtpipe.generation.sessions import decoder_session, session_places

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """One prompt's completion."""

    prompt: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationRun:
    """Results in prompt order plus timings of the whole run."""

    results: list[GenerationResult]
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "prompts": len(self.results),
            "generated_tokens": self.generated_tokens,
            "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_ms_p50": round(1000 * statistics.median(self.ttft_s), 3) if self.ttft_s else None,
        }


def special_ids(engine_path: Path, tokenizer: Any) -> tuple[set[int], int]:
    """(EOS ids, pad id) from generation_config.json / config.json / the tokenizer."""
    eos: set[int] = set()
    pad: int | None = None
    for name in ("generation_config.json", "config.json"):
        path = engine_path / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        value = data.get("eos_token_id")
        if value is not None and not eos:
            eos = {int(v) for v in (value if isinstance(value, list) else [value])}
        if pad is None and isinstance(data.get("pad_token_id"), int):
            pad = int(data["pad_token_id"])
    if not eos and tokenizer.eos_token_id is not None:
        eos = {int(tokenizer.eos_token_id)}
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    return eos, int(pad)


def fast_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` without the Python wrapper's cost.

    A fast tokenizer's Rust ``decode`` gives the same text (plus HF's optional clean-up of
    spaces); the wrapper's argument conversion costs ~6x the decode itself, which matters when
    every row of every step is decoded. Slow tokenizers keep the wrapper.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "decode"):
        return lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        clean = tokenizer.clean_up_tokenization
        return lambda ids: str(clean(backend.decode(ids, skip_special_tokens=True)))
    return lambda ids: str(backend.decode(ids, skip_special_tokens=True))


class Generator:
    """Generate text with a decoder engine on ``devices`` (default: one CPU worker)."""

    def __init__(
        self,
        engine: str | Path | EngineDir,
        devices: Sequence[Device] | None = None,
        threads: int | None = None,
        interleave: int = 2,
    ):
        """``interleave``: sessions per pipeline replica of a staged engine (each with its own
        cache, sharing the stages), so that many groups of sequences overlap across the stages."""
        from trtpipe.text import load_tokenizer

        self.engine = engine if isinstance(engine, EngineDir) else EngineDir(engine)
        self.devices = list(devices or [Device("cpu", 0)])
        self.tokenizer = load_tokenizer(str(self.engine.path))
        self.stop_ids, self.pad_id = special_ids(self.engine.path, self.tokenizer)
        self._decode = fast_decoder(self.tokenizer)
        self.sessions: list[DecoderSession] = []
        # One session per device, or per device group of a pipeline-stage engine.
        self.places: list[str] = []
        try:
            for group in session_places(self.engine, self.devices):
                session = decoder_session(self.engine, group, threads)
                session.load()
                self.sessions.append(session)
                twin = getattr(session, "twin", None)  # staged: more sessions, same stages
                extra = [twin() for _ in range(interleave - 1)] if twin is not None else []
                self.sessions.extend(extra)
                self.places.extend([",".join(str(d) for d in group)] * (1 + len(extra)))
        except BaseException:
            self.close()
            raise
        self.spec = self.sessions[0].spec
        self._locks = [threading.Lock() for _ in self.sessions]
        self._next = 0
        self._next_lock = threading.Lock()

    # -- batch API ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams | None = None,
        batch_size: int | None = None,
    ) -> list[GenerationResult]:
        return self.run(prompts, params, batch_size).results

    def run(
        self,
        prompts: Sequence[str],
        params: SamplingParams | None = None,
        batch_size: int | None = None,
    ) -> GenerationRun:
        """All prompts, chunked by ``batch_size`` and dealt round-robin across devices."""
        params = (params or SamplingParams()).validate()
        ids = tokenize(self.tokenizer, prompts)
        size = batch_size or self.spec.max_batch
        if size > self.spec.max_batch:
            raise InputError(
                f"--batch-size {size} exceeds the engine's maximum batch {self.spec.max_batch}"
            )
        parts = chunks(list(range(len(ids))), size)
        for part in parts:  # refuse before any device work starts
            from trtpipe.generation.loop import check_limits

            check_limits(self.spec, [ids[i] for i in part], params.max_new_tokens)
        outputs: dict[int, tuple[SequenceResult, str]] = {}
        ttfts: list[float] = []
        start = time.perf_counter()

        def work(worker: int, chunk_numbers: list[int]) -> None:
            for number in chunk_numbers:
                part = parts[number]
                results, ttft = self._run_chunk(worker, [ids[i] for i in part], part, params)
                with self._next_lock:
                    ttfts.append(ttft)
                    for result in results:
                        outputs[result.index] = (result, self.places[worker])

        plan = deal(len(parts), len(self.sessions))
        if len(self.sessions) == 1:
            work(0, plan[0])
        else:
            with ThreadPoolExecutor(len(self.sessions), thread_name_prefix="generate") as pool:
                futures = [pool.submit(work, w, numbers) for w, numbers in enumerate(plan)]
                for future in futures:
                    future.result()
        wall = time.perf_counter() - start
        results = [self._result(prompts[i], *outputs[i]) for i in range(len(ids))]
        return GenerationRun(results, wall, ttfts)

    def _run_chunk(
        self, worker: int, rows: list[list[int]], indices: list[int], params: SamplingParams
    ) -> tuple[list[SequenceResult], float]:
        results: list[SequenceResult] = []
        ttft = 0.0
        with self._locks[worker]:
            events = iterate_batch(
                self.sessions[worker], rows, indices, params, self.stop_ids, self.pad_id, results
            )
            for event in events:
                if event.step == 0:
                    ttft = event.elapsed_s
        return results, ttft

    def _result(self, prompt: str, seq: SequenceResult, device: str) -> GenerationResult:
        return GenerationResult(
            prompt=prompt,
            text=self.decode(seq.token_ids),
            token_ids=seq.token_ids,
            prompt_tokens=len(seq.prompt_ids),
            finish_reason=seq.finish_reason,
            device=device,
        )

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._decode(list(token_ids))

    # -- streaming ---------------------------------------------------------------------------
    def stream(self, prompt: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are generated (one prompt; holds one device meanwhile).

        Closing the iterator early stops generation and frees the device.
        """
        for piece, _ in self.stream_tokens(prompt, params):
            if piece:
                yield piece

    def stream_tokens(
        self, prompt: str, params: SamplingParams | None = None, index: int = 0
    ) -> Stream[tuple[str, SequenceResult], None, None]:
        """Like ``stream`` but also yields the running result (ids, finish reason)."""
        params = (params or SamplingParams()).validate()
        rows = tokenize(self.tokenizer, [prompt])
        from trtpipe.generation.loop import check_limits

        check_limits(self.spec, rows, params.max_new_tokens)
        worker = self._acquire()
        try:
            results: list[SequenceResult] = []
            sent = ""
            events = iterate_batch(
                self.sessions[worker], rows, [index], params, self.stop_ids, self.pad_id, results
            )
            for event in events:
                text = self.decode(results[0].token_ids)
                last = bool(event.finished) or event.step == params.max_new_tokens - 1
                # Hold back a partial multi-byte character until it is complete (or the end).
                piece = text[len(sent) :] if last or not text.endswith("\ufffd") else ""
                sent += piece
                yield piece, results[0]
        finally:
            self._locks[worker].release()

    def _acquire(self) -> int:
        """A free device if there is one (round-robin start), else wait for the next in turn."""
        with self._next_lock:
            first = self._next
            self._next = (self._next + 1) % len(self.sessions)
        count = len(self.sessions)
        for offset in range(count):
            worker = (first + offset) % count
            if self._locks[worker].acquire(blocking=False):
                return worker
        self._locks[first].acquire()
        return first

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        for session in self.sessions:
            try:
                session.close()
            except Exception as exc:  # keep freeing the others
                log.warning("closing %s failed: %s", session.describe(), exc)
        self.sessions = []

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
