"""The served real-text bench's offline side: the same engine called directly, in the bench's
process, on the sentences the server is sent.

It gives the reply check's reference vectors, the sorted and arrival-order throughput that
served levels are judged against, and the direct batch-1 calls of the c1 overhead. The engine
stays loaded for the whole command so that its sorted throughput can be measured again after
each protocol while the server is idle: a shared machine's speed drifts by tens of percent
within minutes, so each protocol is judged against the engine's speed in the minutes it ran,
not only at the start.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.bench.common import SETTLE_S, timed
from trtpipe.bench.stats import LatencyStats, median
from trtpipe.devices import cpu_cores
from trtpipe.errors import InputError


@dataclass
class Offline:
    """The engine called directly on the same sentences."""

    vectors: np.ndarray  # batch-1 sentence embedding per text, the reply check's reference
    direct_p50_ms: float
    sorted_per_s: float
    arrival_per_s: dict[int, float]
    ids: list[list[int]]
    precision: str
    inputs: list[str]
    pad_id: int = 0
    threads: int = 0  # the intra-op threads of the offline runs on a CPU (0: a GPU ran them)

    @property
    def sorted_ms_per_sentence(self) -> float | None:
        """The sorted CPU run's thread time per sentence, comparable to a served level's
        ``engine_ms_per_request`` (one-thread workers, summed over workers); None on a GPU."""
        if not self.threads or not self.sorted_per_s:
            return None
        return self.threads * 1000.0 / self.sorted_per_s


Batch1Seconds = Callable[[list[int]], list[float]]


@contextlib.contextmanager
def offline_engine(
    engine_dir: Path, texts: list[str], concurrency: list[int], threads: int | None, runs: int
) -> Iterator[tuple[Offline, Callable[[], float], Batch1Seconds]]:
    """The engine loaded once for the command: yields its offline figures on ``texts``,
    ``sorted_rate()``, which measures the sorted real-text throughput again (the median of
    ``runs`` passes over every sentence), and ``batch1_seconds(indices)``, the direct batch-1
    call's time for each of those sentences. ``threads``: intra-op threads (None: every core);
    ``concurrency``: the levels whose arrival-order figures to measure."""
    from trtpipe.bench.common import default_device, engine_runner
    from trtpipe.bench.text import pad_batch, plan_batches
    from trtpipe.engine import EngineDir
    from trtpipe.server.text_input import POOLED_OUTPUT
    from trtpipe.text import load_tokenizer

    engine = EngineDir(engine_dir)
    manifest = engine.manifest
    if POOLED_OUTPUT not in {s.name for s in manifest.outputs}:
        raise InputError(
            f"the served real-text bench checks {POOLED_OUTPUT!r}; {engine.path} has outputs "
            f"{[s.name for s in manifest.outputs]}"
        )
    tokenizer = load_tokenizer(str(engine.path))
    max_len = min(r.max[1] for r in manifest.profile.values() if len(r.max) == 2)
    ids = tokenizer(texts, truncation=True, max_length=max_len, padding=False)["input_ids"]
    lengths = np.array([len(t) for t in ids])
    pad_id = tokenizer.pad_token_id or 0
    threads, device = threads or cpu_cores(), default_device(manifest)
    runner = engine_runner(engine, device, threads)
    max_batch = manifest.max_batch_size
    with runner:

        def run(rows: np.ndarray) -> dict[str, np.ndarray]:
            return runner.infer(pad_batch(ids, rows, manifest.inputs, pad_id))

        def timed_pass(batches: list[np.ndarray]) -> float:
            start = time.perf_counter()
            for rows in batches:
                run(rows)
            return len(ids) / (time.perf_counter() - start)

        def rate(batches: list[np.ndarray]) -> float:
            figure = median([timed_pass(batches) for _ in range(runs)])
            time.sleep(SETTLE_S)  # the engine's spinning threads idle before the server's turn
            return figure

        vectors = np.stack([run(np.array([i]))[POOLED_OUTPUT][0] for i in range(len(ids))])
        single = _batch1_seconds(run, range(min(len(ids), 200)))
        sorted_batches = plan_batches(lengths, max_batch)
        timed_pass(sorted_batches)  # warm-up
        sorted_rate = rate(sorted_batches)
        arrival: dict[int, float] = {}
        for level in concurrency:
            size = min(level, max_batch)
            arrival[level] = rate(
                [np.arange(s, min(s + size, len(ids))) for s in range(0, len(ids), size)]
            )
        offline = Offline(
            vectors=vectors.astype(np.float32),
            direct_p50_ms=LatencyStats.from_seconds(single).p50_ms,
            sorted_per_s=sorted_rate,
            arrival_per_s=arrival,
            ids=[list(t) for t in ids],
            precision=manifest.precision,
            inputs=[s.name for s in manifest.inputs],
            pad_id=pad_id,
            threads=0 if device.is_gpu else threads,
        )
        yield offline, partial(rate, sorted_batches), partial(_batch1_seconds, run)


def _batch1_seconds(run: Any, indices: Any) -> list[float]:
    return [timed(partial(run, np.array([i])))[0] for i in indices]


@contextlib.contextmanager
def direct_batch1(
    engine_dir: Path, ids: list[list[int]], pad_id: int, threads: int
) -> Iterator[Batch1Seconds]:
    """The engine loaded for a c1 level's overhead runs, with the intra-op threads of one
    server worker, where the command's offline engine runs with others: yields
    ``seconds(indices)``, the direct batch-1 call's time for each of those sentences (``ids``:
    every sentence's token ids)."""
    from trtpipe.bench.common import default_device, engine_runner
    from trtpipe.bench.text import pad_batch
    from trtpipe.engine import EngineDir

    engine = EngineDir(engine_dir)
    manifest = engine.manifest
    runner = engine_runner(engine, default_device(manifest), threads)
    with runner:

        def run(rows: np.ndarray) -> dict[str, np.ndarray]:
            return runner.infer(pad_batch(ids, rows, manifest.inputs, pad_id))

        yield partial(_batch1_seconds, run)
