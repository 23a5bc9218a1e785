"""Dynamic batching: many small requests become few launches, each answered with its own rows.

Requests are validated on arrival (a bad one never poisons a batch), queued by input signature,
and launched when the queue holds ``max_batch_size`` rows or its oldest request has waited
``max_queue_delay_ms``. Requests of different sequence lengths share a launch by padding
(attention mask 0) to the longest in the batch rounded up to a multiple of ``bucket_multiple``;
a launch takes the oldest request and its nearest neighbours in length while padding stays
within ``max_padding_share`` and costs less than the launch overhead it shares, which the
batcher learns from its own launches (``batch_plan``, ``launch_cost``). Up to one batch per
healthy device is in flight, plus one prepared ahead, so N devices work at once and none waits
for the next launch; while they are busy requests pile up and batches grow by themselves.

What waits lives in ``request_queue``. Batches are formed by a callback at the loop's next turn
after any change, and a launch's result comes back by one callback from the device thread: no
task per launch and no scheduler task (each task wake-up cost tens of microseconds per request
at concurrency 1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtpipe.errors import InputError, RunnerError, TrtpipeError
from trtpipe.runners.base import validate_feeds
from trtpipe.runtime.batch_config import BatcherConfig
from trtpipe.runtime.batch_hooks import BatchHooks, PaddingHooks
from trtpipe.runtime.batch_plan import padded_length
from trtpipe.runtime.device_worker import Job
from trtpipe.runtime.launch_cost import LaunchCostModel
from trtpipe.runtime.padding import Layout
from trtpipe.runtime.pool import DevicePool
from trtpipe.runtime.request_queue import LengthPlan, QueuedRequest, RequestQueue
from trtpipe.runtime.stats import BatcherStats

log = logging.getLogger(__name__)


class QueueFullError(TrtpipeError):
    """The queue already holds ``max_queue_size`` requests (HTTP 503, gRPC UNAVAILABLE)."""


class BatcherStoppedError(QueueFullError):
    """The batcher is shutting down or not started; like a full queue, retry elsewhere (503)."""


class RequestTimeoutError(TrtpipeError):
    """A request was not answered within ``timeout_s`` (HTTP 504, gRPC DEADLINE_EXCEEDED)."""


@dataclass(eq=False)
class _Launch:
    batch: list[QueuedRequest]
    start_ns: int
    infer_ns: int = 0
    padded: int = 0
    job: Job | None = None


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """From a device thread; a loop already closed (shutdown without drain) drops the result."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        log.debug("a launch finished after its event loop closed")


class DynamicBatcher:
    """Queue, group, pad, launch on the pool, and hand each request its own rows back."""

    def __init__(
        self,
        pool: DevicePool,
        config: BatcherConfig | None = None,
        hooks: Callable[[Layout], BatchHooks] | None = None,
    ):
        """``hooks(layout)`` builds how launches are assembled (default: padding hooks with the
        config's pad ids and side)."""
        self.pool = pool
        self.config = config or BatcherConfig()
        self.config.validate()
        self._make_hooks = hooks or self._padding_hooks
        self._hooks: BatchHooks | None = None
        self.stats = BatcherStats()
        self.launch_costs = LaunchCostModel()
        self._queue = RequestQueue()
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick_due = False  # a _kick is already queued on the loop
        self._wake_timer: asyncio.TimerHandle | None = None  # when a queue head's wait ends
        self._changed: asyncio.Event | None = None  # only stop() waits on it
        self._running = False
        self._stopping = False
        self._last_launch_requests = 0
        self._layout: Layout | None = None
        self.max_batch_size = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the pool if needed (off the loop); batches are formed on the calling loop."""
        if self._running:
            return
        if not self.pool.started:
            await asyncio.to_thread(self.pool.start)
        self._layout = Layout(self.pool.inputs, self.pool.outputs, self.pool.profile)
        self._hooks = self._make_hooks(self._layout)
        limit = self.pool.max_batch_size
        wanted = self.config.max_batch_size or limit
        if wanted > limit:
            log.warning(
                "max batch size %d exceeds the engine's profile maximum %d; using %d",
                wanted,
                limit,
                limit,
            )
        self.max_batch_size = min(wanted, limit) if self._layout.batchable else 1
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._stopping = False
        self._running = True
        log.info(
            "batcher started: max batch %d, delay %.1f ms, queue %d, %d device(s)",
            self.max_batch_size,
            self.config.max_queue_delay_ms,
            self.config.max_queue_size,
            self.pool.healthy_count,
        )

    async def stop(self, drain: bool = True) -> None:
        """Refuse new requests; finish every accepted one (``drain``) or fail the queued ones."""
        if not self._running:
            return
        self._stopping = True
        if not drain:
            self._fail_queued(BatcherStoppedError("the server is shutting down"))
        self._notify()
        changed = self._changed
        while (self._queue.pending or self._inflight) and changed is not None:
            changed.clear()  # every launch, finish and expiry notifies
            await changed.wait()
        if self._wake_timer is not None:
            self._wake_timer.cancel()
        self._running = False
        log.info("batcher stopped (%d requests answered)", self.stats.request_success)

    @property
    def running(self) -> bool:
        return self._running and not self._stopping

    @property
    def pending(self) -> int:
        """Requests waiting in the queue (not yet launched)."""
        return self._queue.pending

    @property
    def inflight_batches(self) -> int:
        return self._inflight

    # -- submit ------------------------------------------------------------------------------
    async def submit(
        self, feeds: dict[str, np.ndarray], validated: bool = False
    ) -> dict[str, np.ndarray]:
        """Queue one request (batch dim n >= 1) and return exactly its own output rows.

        ``validated`` says the caller already checked the feeds against the engine's specs and
        profile (names, dtypes, ranks, limits), so they are not checked a second time here.
        """
        if not self._running or self._stopping:
            raise BatcherStoppedError(
                "the model is not accepting requests (shutting down or not started)"
            )
        loop = asyncio.get_running_loop()
        try:
            request = self._prepare(feeds, loop, validated)
        except InputError:
            self.stats.request_failure += 1
            raise
        if self._queue.pending >= self.config.max_queue_size:
            self.stats.request_failure += 1
            self.stats.rejected_queue_full += 1
            raise QueueFullError(
                f"the queue is full ({self.config.max_queue_size} requests waiting); retry "
                "later, or raise --max-queue-size / add devices"
            )
        self._enqueue(request)
        if self.config.timeout_s is not None:
            request.timer = loop.call_later(self.config.timeout_s, self._expire, request)
        try:
            return await request.future
        except asyncio.CancelledError:
            if not request.future.done():
                self._queue.remove(request)
                self.stats.request_failure += 1
                request.future.cancel()
                self._notify()
            raise

    def _prepare(
        self, feeds: dict[str, np.ndarray], loop: asyncio.AbstractEventLoop, validated: bool
    ) -> QueuedRequest:
        layout = self._layout
        assert layout is not None
        if not isinstance(feeds, dict):
            raise InputError("a request is a mapping of input names to arrays")
        checked = feeds if validated else validate_feeds(feeds, layout.inputs, self.pool.profile)
        rows = 1
        if layout.batchable:
            rows = int(checked[layout.inputs[0].name].shape[0])
            if rows < 1:
                raise InputError("the request has no rows (batch dimension is 0)")
            if rows > self.max_batch_size:
                raise InputError(
                    f"the request has {rows} rows; this model takes at most "
                    f"{self.max_batch_size} per request"
                )
        lengths = {
            (name, int(checked[name].shape[axis]))
            for name, axes in layout.seq_axes.items()
            for axis in axes
        }
        distinct = {length for _, length in lengths}
        if len(distinct) > 1:
            raise InputError(
                "inputs disagree on sequence length: "
                + ", ".join(f"{n}={v}" for n, v in sorted(lengths))
            )
        seq_len = distinct.pop() if distinct else 0
        signature = tuple(
            (
                spec.name,
                tuple(
                    -1 if axis in layout.seq_axes[spec.name] else dim
                    for axis, dim in enumerate(checked[spec.name].shape)
                    if axis > 0 or not layout.batchable
                ),
            )
            for spec in layout.inputs
        )
        group = 0 if layout.batchable else seq_len  # unbatchable: only equal shapes share
        return QueuedRequest(
            feeds=checked,
            rows=rows,
            seq_len=seq_len,
            key=(group, signature),
            future=loop.create_future(),
            arrival=loop.time(),
            arrival_ns=time.perf_counter_ns(),
        )

    # -- queue ---------------------------------------------------------------------------------
    def _notify(self) -> None:
        """Something changed (arrival, finish, expiry, stop): form batches at the loop's next
        turn, once however many changes come in this one, so requests that arrive together
        still share a launch."""
        if self._changed is not None:
            self._changed.set()
        if not self._kick_due and self._loop is not None:
            self._kick_due = True
            self._loop.call_soon(self._kick)

    def _enqueue(self, request: QueuedRequest) -> None:
        self._queue.add(request)
        self._notify()

    def _take(self, key: tuple[Any, ...]) -> list[QueuedRequest]:
        """The oldest request of the group plus what shares its launch (see module docstring)."""
        layout = self._layout
        assert layout is not None
        plan = None
        # A lone queued request (concurrency 1) launches alone: skip fitting the launch cost.
        if self.config.group_by_length and self._queue.pending > 1:
            config = self.config
            learnt = self.launch_costs.overhead_positions() if config.learn_launch_cost else None
            plan = LengthPlan(
                config.max_padding_share, config.bucket_multiple, layout.max_seq, learnt
            )
        return self._queue.take(key, self.max_batch_size, layout.batchable, plan)

    def _capacity(self) -> int:
        """Batches out at once: one per healthy device plus one prepared ahead, which waits in
        the pool so a device that finishes starts the next launch without a round trip through
        the event loop (served MiniLM on a CPU: the engine ran 93% of the time without it, 99%
        with it)."""
        if self.config.max_inflight_batches is not None:
            return self.config.max_inflight_batches
        return max(1, self.pool.healthy_count) + 1

    def _queue_delay_s(self) -> float:
        """How long a queue head may wait for company: no wait while requests come one at a
        time (adaptive delay: the last launch ran alone and nothing is queued or running)."""
        if (
            self.config.adaptive_delay
            and self._queue.pending <= 1
            and self._last_launch_requests <= 1
            and self._inflight == 0
        ):
            return 0.0
        return self.config.max_queue_delay_ms / 1000.0

    def _kick(self) -> None:
        """Launch every group that is ready while devices can take it; else wake at the
        earliest queue head's deadline."""
        self._kick_due = False
        if self._wake_timer is not None:
            self._wake_timer.cancel()
            self._wake_timer = None
        loop = self._loop
        assert loop is not None
        try:
            while self._queue.pending and self._inflight < self._capacity():
                key, wake = self._queue.next_ready(
                    loop.time(), self._queue_delay_s(), self.max_batch_size, self._stopping
                )
                if key is None:
                    if wake is not None:
                        self._wake_timer = loop.call_at(wake, self._kick)
                    return
                self._launch(self._take(key))
        except Exception as exc:
            self._scheduling_failed(exc)

    def _scheduling_failed(self, exc: Exception) -> None:
        """A bug in forming batches: fail what is queued and refuse more, rather than hang."""
        log.error("the batch scheduler failed", exc_info=exc)
        self._fail_queued(RunnerError(f"the batch scheduler failed: {exc}"))
        self._stopping = True
        if self._changed is not None:
            self._changed.set()

    # -- launch ------------------------------------------------------------------------------
    def _launch(self, batch: list[QueuedRequest]) -> None:
        """Pad ``batch`` and hand it to the pool now; :meth:`_finish` answers it on the loop.

        No task per launch: the device thread's result comes back in one ``call_soon_threadsafe``
        (a task and ``wrap_future`` cost two more turns of the loop per launch).
        """
        self._inflight += 1
        self._last_launch_requests = len(batch)
        launch = _Launch(batch, time.perf_counter_ns())
        try:
            hooks = self._hooks
            assert hooks is not None, "start() the batcher first"
            launch.padded = self._padded_length(batch)
            feeds = hooks.prepare([(r.feeds, r.rows) for r in batch], launch.padded)
            launch.infer_ns = time.perf_counter_ns()
            launch.job = self.pool.submit(feeds)
        except Exception as exc:
            self._finish(launch, exc)
            return
        loop = self._loop
        assert loop is not None
        launch.job.future.add_done_callback(lambda _: _call_soon(loop, self._finish, launch))

    def _finish(self, launch: _Launch, error: BaseException | None = None) -> None:
        """On the loop: each request of the launch gets its own rows, or the launch's error."""
        batch = launch.batch
        try:
            if error is None:
                assert launch.job is not None
                error = launch.job.future.exception()
            if error is None:
                self._answer(launch)
                return
        except Exception as exc:
            error = exc
        finally:
            self._inflight -= 1
            self._notify()
        if not isinstance(error, TrtpipeError):
            log.error("batch of %d request(s) failed", len(batch), exc_info=error)
            error = RunnerError(f"batch failed: {error}")
        for request in batch:
            self._fail(request, error)

    def _answer(self, launch: _Launch) -> None:
        assert launch.job is not None and self._hooks is not None
        output_ns = time.perf_counter_ns()
        batch, padded, job = launch.batch, launch.padded, launch.job
        results = self._hooks.split(
            job.future.result(), [(r.rows, r.seq_len) for r in batch], padded
        )
        end_ns = time.perf_counter_ns()
        rows = sum(r.rows for r in batch)
        self.launch_costs.record(rows * padded, job.device_ns / 1e9)
        stats = self.stats
        stats.record_execution(rows, output_ns - launch.infer_ns)
        stats.real_tokens += sum(r.rows * r.seq_len for r in batch)
        stats.padded_tokens += sum(r.rows * (padded - r.seq_len) for r in batch)
        for request, result in zip(batch, results, strict=True):
            if request.future.done():
                continue  # timed out or cancelled while running
            request.state = "done"
            if request.timer is not None:
                request.timer.cancel()
            request.future.set_result(result)
            stats.request_success += 1
            stats.success_ns += end_ns - request.arrival_ns
            stats.queue_ns += launch.start_ns - request.arrival_ns
            stats.compute_input_ns += launch.infer_ns - launch.start_ns
            stats.compute_infer_ns += output_ns - launch.infer_ns
            stats.compute_output_ns += end_ns - output_ns

    def _padding_hooks(self, layout: Layout) -> BatchHooks:
        right = self.config.padding_side == "right"
        return PaddingHooks(layout, self.config.pad_token_ids, right)

    def _padded_length(self, batch: list[QueuedRequest]) -> int:
        """The batch's one length, else its longest rounded up to ``bucket_multiple``."""
        lengths = [r.seq_len for r in batch]
        limit = self._layout.max_seq if self._layout is not None else None
        return padded_length(min(lengths), max(lengths), self.config.bucket_multiple, limit)

    def _fail_queued(self, error: BaseException) -> None:
        """Every request still waiting gets ``error`` (no-drain stop, a scheduling fault)."""
        for request in self._queue.waiting():
            self._queue.remove(request)
            self._fail(request, error)

    def _fail(self, request: QueuedRequest, error: BaseException) -> None:
        request.state = "done"
        if request.timer is not None:
            request.timer.cancel()
        if not request.future.done():
            request.future.set_exception(error)
            self.stats.request_failure += 1

    def _expire(self, request: QueuedRequest) -> None:
        if request.future.done():
            return
        where = "in the queue" if request.state == "queued" else "while running"
        self._queue.remove(request)
        self.stats.timeouts += 1
        self._fail(
            request,
            RequestTimeoutError(
                f"request not answered within {self.config.timeout_s:g} s (expired {where}, "
                f"{self._queue.pending} waiting); raise --timeout or add devices"
            ),
        )
        self._notify()
