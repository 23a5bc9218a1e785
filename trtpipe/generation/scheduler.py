"""Iteration-level (continuous) batching: one scheduler thread per decoder session.

The thread owns a ``RunningBatch``. Between two decode steps it retires rows that finished
(EOS, max tokens, stop string) or whose client went away, then admits waiting requests in
arrival order while the engine's limits hold for every live row after the join (batch maximum;
rebuilt width + the most tokens any row still needs < the engine's total length). Admitted
requests are prefilled together (one left-padded step with past 0), take their first token,
and are copied into the running cache beside the live rows (``batch_state.join_caches``).
Admission never evicts: a request that does not fit waits; a full queue is refused
(``QueueFullError``, HTTP 503) and a request not admitted within ``timeout_s`` fails with
``RequestTimeoutError`` (504). ``stop()`` drains: running rows finish, waiting and new
requests are refused with ``BatcherStoppedError`` (503).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from trtpipe.errors import InputError, TrtpipeError
from trtpipe.generation.batch_state import Row, RunningBatch, join_caches
from trtpipe.generation.histogram import LatencyHistogram
from trtpipe.generation.kv_cache import DecoderSession
from trtpipe.generation.prompts import left_pad, position_ids
from trtpipe.generation.sequence import Sequence
from trtpipe.runtime.batcher import BatcherStoppedError, QueueFullError, RequestTimeoutError

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """Limits of one scheduler; ``None`` batch size means the engine's profile maximum."""

    max_batch_size: int | None = None
    max_queue_size: int = 1024
    timeout_s: float | None = 30.0  # longest wait for admission

    def validate(self) -> SchedulerConfig:
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise InputError(f"max batch size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_size < 1:
            raise InputError(f"max queue size must be >= 1, got {self.max_queue_size}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise InputError(f"timeout must be > 0 s (or none), got {self.timeout_s}")
        return self


@dataclass
class SchedulerStats:
    """Counters read by the server's /stats and metrics (written by the scheduler thread)."""

    steps: int = 0
    prefills: int = 0
    rebuilds: int = 0
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    timed_out: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    peak_rows: int = 0  # most rows a step ran with


class Scheduler:
    """Continuous batching over one loaded ``DecoderSession`` (see the module docstring)."""

    def __init__(
        self,
        session: DecoderSession,
        pad_id: int,
        config: SchedulerConfig | None = None,
        name: str = "generation",
    ):
        self.session = session
        self.spec = session.spec
        self.config = (config or SchedulerConfig()).validate()
        limit = self.spec.max_batch
        self.max_batch = min(self.config.max_batch_size or limit, limit)
        self.batch = RunningBatch(self.max_batch, self.spec.max_total, pad_id)
        self.pad_id = pad_id
        self.name = name
        self.stats = SchedulerStats()
        self.ttft = LatencyHistogram()  # submit -> first token (queue wait + prefill)
        self.itl = LatencyHistogram()  # between two tokens of one sequence
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._accepting = False
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- caller side ---------------------------------------------------------------------------
    def start(self) -> Scheduler:
        with self._cond:
            if self._thread is not None:
                return self
            self._accepting, self._stop = True, False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def check(self, seq: Sequence) -> None:
        """Refuse a request the engine could never run (InputError, HTTP 400)."""
        length, new = len(seq.prompt_ids), seq.params.max_new_tokens
        if length < 1:
            raise InputError("the prompt tokenizes to nothing; give some text")
        if length > self.spec.max_prompt:
            raise InputError(
                f"prompt of {length} tokens is longer than the engine allows "
                f"({self.spec.max_prompt}); shorten it or rebuild with a larger --max-shapes"
            )
        if length + new > self.spec.max_total:
            raise InputError(
                f"prompt of {length} tokens + max tokens {new} exceeds the engine's total "
                f"length {self.spec.max_total}; ask for at most {self.spec.max_total - length}"
            )

    def submit(self, *seqs: Sequence) -> None:
        """Queue ``seqs`` together (all or none; the choices of one request, say); their events
        go to their sinks. Raises at once if they cannot be queued."""
        for seq in seqs:
            self.check(seq)
        with self._cond:
            if not self._accepting:
                self.stats.rejected += len(seqs)
                raise BatcherStoppedError(f"{self.name} is draining or stopped; retry elsewhere")
            if len(self._waiting) + len(seqs) > self.config.max_queue_size:
                self.stats.rejected += len(seqs)
                raise QueueFullError(
                    f"{self.name}: {len(self._waiting)} requests already wait "
                    f"(max queue size {self.config.max_queue_size}); retry later"
                )
            now = time.monotonic()
            for seq in seqs:
                seq.submitted = now
                self._waiting.append(seq)
            self._cond.notify()

    @property
    def accepting(self) -> bool:
        """False once ``stop`` began: new requests are refused (503)."""
        return self._accepting

    @property
    def running(self) -> int:
        return len(self.batch.live)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def slots_in_use(self) -> int:
        """Rows of the cache held (dead rows too, until the next rebuild)."""
        return len(self.batch.rows)

    def load(self) -> int:
        """Running + waiting sequences: the dispatcher picks the least loaded scheduler."""
        return self.running + self.waiting

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; running rows finish (``drain``) or fail; then the thread ends."""
        with self._cond:
            self._accepting = False
            refused = list(self._waiting)
            self._waiting.clear()
            if not drain:
                refused += [row.seq for row in self.batch.live]
                for row in self.batch.live:
                    row.seq.cancel()
            self._stop = True
            self._cond.notify()
        for seq in refused:
            seq.fail(BatcherStoppedError(f"{self.name} is shutting down; retry elsewhere"))
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    # -- scheduler thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.batch.live and not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop and not self.batch.live:
                    self.batch.rows, self.batch.width = [], 0
                    return
                self._expire_locked()
                joining = self._pick_locked()
            try:
                self._retire_cancelled()
                if joining:
                    self._admit(joining)
                elif self.batch.dead_count * 2 >= len(self.batch.rows) and self.batch.rows:
                    self._rebuild([], [], None)
                if self.batch.live:
                    self._step()
                else:
                    self.batch.rows, self.batch.width = [], 0
                    if not joining and self._waiting:
                        self._wait_for_deadline()
            except Exception as exc:  # a failed step fails its rows, not the scheduler
                log.exception("%s: decode step failed", self.name)
                error = exc if isinstance(exc, TrtpipeError) else TrtpipeError(str(exc))
                for row in self.batch.live:
                    row.seq.fail(error)
                for seq in joining:
                    if seq.finish_reason is None:
                        seq.fail(error)
                self.batch.rows, self.batch.width = [], 0

    def _wait_for_deadline(self) -> None:
        """Nothing runs and the head cannot be admitted: sleep until it may time out."""
        with self._cond:
            if self._waiting and not self.batch.live and not self._stop:
                self._cond.wait(timeout=0.05)

    def _expire_locked(self) -> None:
        timeout = self.config.timeout_s
        if timeout is None:
            return
        now = time.monotonic()
        kept: deque[Sequence] = deque()
        for seq in self._waiting:
            if seq.cancelled:
                self.stats.cancelled += 1
            elif now - seq.submitted > timeout:
                self.stats.timed_out += 1
                seq.fail(RequestTimeoutError(f"not admitted within {timeout:g} s; retry later"))
            else:
                kept.append(seq)
        self._waiting = kept

    def _pick_locked(self) -> list[Sequence]:
        """Waiting requests, in arrival order, that fit beside the live rows."""
        joining: list[Sequence] = []
        while self._waiting:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                self.stats.cancelled += 1
                continue
            if not self.batch.fits([*joining, head]):
                break
            joining.append(self._waiting.popleft())
        return joining

    def _retire_cancelled(self) -> None:
        for row in self.batch.live:
            if row.seq.cancelled:
                row.live = False
                self.stats.cancelled += 1

    def _admit(self, joining: list[Sequence]) -> None:
        """Prefill ``joining`` together, emit their first tokens, join the survivors."""
        old = self.session.read_cache() if self.batch.live else None
        input_ids, mask = left_pad([s.prompt_ids for s in joining], self.pad_id)
        self.session.start(len(joining))
        logits = self.session.step(input_ids, mask, position_ids(mask))
        self.stats.prefills += 1
        self.stats.admitted += len(joining)
        survivors: list[Row] = []
        take: list[int] = []
        best = np.argmax(logits, axis=-1).tolist()
        for i, seq in enumerate(joining):
            self.stats.prompt_tokens += len(seq.prompt_ids)
            token = seq.choose(logits[i], best[i])
            self.stats.generated_tokens += 1
            finished = seq.accept(token, logits[i])
            self.ttft.observe((seq.first_token_at or seq.submitted) - seq.submitted)
            if finished:
                self.stats.finished += 1
                continue
            survivors.append(Row(seq, len(seq.prompt_ids), token))
            take.append(i)
        if old is None and len(take) == len(joining):
            # Nothing was running: the prefill's cache is the batch as it stands.
            self.batch.rows, self.batch.width = survivors, int(input_ids.shape[1])
            return
        new = self.session.read_cache() if take else None
        self._rebuild(survivors, take, new, old)

    def _rebuild(
        self,
        joining: list[Row],
        take: list[int],
        new: list[np.ndarray] | None,
        old: list[np.ndarray] | None = None,
    ) -> None:
        """Live rows (from ``old`` or the session) + ``joining`` into one compact cache."""
        keep = [i for i, row in enumerate(self.batch.rows) if row.live]
        rows = [self.batch.rows[i] for i in keep] + joining
        if not rows:
            self.batch.rows, self.batch.width = [], 0
            return
        if keep and old is None:
            old = self.session.read_cache()
        width = max(row.length for row in rows)
        merged = join_caches(old if keep else None, keep, new, take, width)
        self.session.write_cache(merged)
        self.batch.rows, self.batch.width = rows, width
        self.stats.rebuilds += 1

    def _step(self) -> None:
        input_ids, mask, positions = self.batch.step_feeds()
        logits = self.session.step(input_ids, mask, positions)
        self.batch.advance()
        self.stats.steps += 1
        self.stats.peak_rows = max(self.stats.peak_rows, len(self.batch.rows))
        best = np.argmax(logits, axis=-1).tolist()  # one call for every greedy row
        for i, row in enumerate(self.batch.rows):
            if not row.live:
                continue
            if row.seq.cancelled:
                row.live = False
                self.stats.cancelled += 1
                continue
            token = row.seq.choose(logits[i], best[i])
            self.stats.generated_tokens += 1
            row.pending = token
            finished = row.seq.accept(token, logits[i])
            if row.seq.gap is not None:
                self.itl.observe(row.seq.gap)
            if finished:
                row.live = False
                self.stats.finished += 1
        if not self.batch.live:  # every row finished: the cache is free
            self.batch.rows, self.batch.width = [], 0
