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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtpipe.errors import InputError, RunnerError, TrtpipeError
from trtpipe.runners.base import validate_feeds
from trtpipe.runtime.batch_config import BatcherConfig
from trtpipe.runtime.batch_hooks import BatchHooks, PaddingHooks
from trtpipe.runtime.batch_plan import nearest_lengths, padded_length
from trtpipe.runtime.launch_cost import LaunchCostModel
from trtpipe.runtime.padding import Layout
from trtpipe.runtime.pool import DevicePool
from trtpipe.runtime.stats import BatcherStats

log = logging.getLogger(__name__)


class QueueFullError(TrtpipeError):
    """The queue already holds ``max_queue_size`` requests (HTTP 503, gRPC UNAVAILABLE)."""


class BatcherStoppedError(QueueFullError):
    """The batcher is shutting down or not started; like a full queue, retry elsewhere (503)."""


class RequestTimeoutError(TrtpipeError):
    """A request was not answered within ``timeout_s`` (HTTP 504, gRPC DEADLINE_EXCEEDED)."""


@dataclass(eq=False)
class _Request:
    feeds: dict[str, np.ndarray]
    rows: int
    seq_len: int
    key: tuple[Any, ...]
    future: asyncio.Future[dict[str, np.ndarray]]
    arrival: float  # loop time, seconds
    arrival_ns: int
    state: str = "queued"  # queued -> running -> done
    timer: asyncio.TimerHandle | None = None


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
        self._groups: dict[tuple[Any, ...], deque[_Request]] = {}
        self._group_rows: dict[tuple[Any, ...], int] = {}
        self._pending = 0
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed: asyncio.Event | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._running = False
        self._stopping = False
        self._last_launch_requests = 0
        self._layout: Layout | None = None
        self.max_batch_size = 0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the pool if needed (off the loop) and the scheduler task."""
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
        self._changed = asyncio.Event()
        self._stopping = False
        self._running = True
        self._scheduler = asyncio.create_task(self._schedule(), name="trtpipe-batcher")
        self._scheduler.add_done_callback(self._scheduler_done)
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
            for group in list(self._groups.values()):
                for request in list(group):
                    self._remove(request)
                    self._fail(request, BatcherStoppedError("the server is shutting down"))
        self._notify()
        if self._scheduler is not None:
            await asyncio.gather(self._scheduler, return_exceptions=True)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._running = False
        log.info("batcher stopped (%d requests answered)", self.stats.request_success)

    @property
    def running(self) -> bool:
        return self._running and not self._stopping

    @property
    def pending(self) -> int:
        """Requests waiting in the queue (not yet launched)."""
        return self._pending

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
        if self._pending >= self.config.max_queue_size:
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
                self._remove(request)
                self.stats.request_failure += 1
                request.future.cancel()
                self._notify()
            raise

    def _prepare(
        self, feeds: dict[str, np.ndarray], loop: asyncio.AbstractEventLoop, validated: bool
    ) -> _Request:
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
        return _Request(
            feeds=checked,
            rows=rows,
            seq_len=seq_len,
            key=(group, signature),
            future=loop.create_future(),
            arrival=loop.time(),
            arrival_ns=time.perf_counter_ns(),
        )

    # -- queue -------------------------------------------------------------------------------
    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _enqueue(self, request: _Request) -> None:
        self._groups.setdefault(request.key, deque()).append(request)
        self._group_rows[request.key] = self._group_rows.get(request.key, 0) + request.rows
        self._pending += 1
        self._notify()

    def _remove(self, request: _Request) -> None:
        """Take a queued request out of its group (timeout, cancel, no-drain stop)."""
        if request.state != "queued":
            return
        group = self._groups.get(request.key)
        if group is None or request not in group:
            return
        group.remove(request)
        self._group_rows[request.key] -= request.rows
        if not group:
            del self._groups[request.key]
            del self._group_rows[request.key]
        self._pending -= 1
        request.state = "done"

    def _take(self, key: tuple[Any, ...]) -> list[_Request]:
        """The oldest request of the group plus what shares its launch (see module docstring)."""
        if self.config.group_by_length and self._layout is not None and self._layout.batchable:
            return self._take_nearest(key)
        group = self._groups[key]
        head = group.popleft()
        batch, rows, left = [head], head.rows, deque[_Request]()
        while group:
            request = group.popleft()
            if (
                self._layout is not None
                and self._layout.batchable
                and (rows + request.rows <= self.max_batch_size)
            ):
                batch.append(request)
                rows += request.rows
            else:
                left.append(request)
            if rows >= self.max_batch_size:
                break
        left.extend(group)
        return self._detach(key, batch, left)

    def _take_nearest(self, key: tuple[Any, ...]) -> list[_Request]:
        """The oldest request and its nearest neighbours in length (``batch_plan``)."""
        group = list(self._groups[key])
        picked = nearest_lengths(
            [r.seq_len for r in group],
            [r.rows for r in group],
            self.max_batch_size,
            self.config.max_padding_share,
            self.config.bucket_multiple,
            self._layout.max_seq if self._layout is not None else None,
            self.launch_costs.overhead_positions() if self.config.learn_launch_cost else None,
        )
        chosen = set(picked)
        left = deque(r for i, r in enumerate(group) if i not in chosen)
        return self._detach(key, [group[i] for i in picked], left)

    def _detach(
        self, key: tuple[Any, ...], batch: list[_Request], left: deque[_Request]
    ) -> list[_Request]:
        """Take ``batch`` out of its group (``left`` is what stays queued), mark it running."""
        if left:
            self._groups[key] = left
            self._group_rows[key] -= sum(r.rows for r in batch)
        else:
            del self._groups[key]
            del self._group_rows[key]
        self._pending -= len(batch)
        for request in batch:
            request.state = "running"
        return batch

    def _capacity(self) -> int:
        """Batches out at once: one per healthy device plus one prepared ahead, which waits in
        the pool so a device that finishes starts the next launch without a round trip through
        the event loop (served MiniLM on a CPU: the engine ran 93% of the time without it, 99%
        with it)."""
        if self.config.max_inflight_batches is not None:
            return self.config.max_inflight_batches
        return max(1, self.pool.healthy_count) + 1

    def _next_group(self, now: float) -> tuple[tuple[Any, ...] | None, float | None]:
        """(group to launch now, or None; when to look again if nothing is ready)."""
        delay = self.config.max_queue_delay_ms / 1000.0
        if (
            self.config.adaptive_delay
            and self._pending == 1
            and self._last_launch_requests <= 1
            and self._inflight == 0
        ):
            delay = 0.0
        ready: tuple[float, tuple[Any, ...]] | None = None
        wake: float | None = None
        for key, group in self._groups.items():
            head = group[0]
            deadline = head.arrival + delay
            full = self._group_rows[key] >= self.max_batch_size
            if full or deadline <= now or self._stopping:
                if ready is None or head.arrival < ready[0]:
                    ready = (head.arrival, key)
            elif wake is None or deadline < wake:
                wake = deadline
        return (ready[1] if ready else None), wake

    async def _schedule(self) -> None:
        """The one task that forms batches; launches run as their own tasks."""
        changed = self._changed
        assert changed is not None
        loop = asyncio.get_running_loop()
        while True:
            changed.clear()
            if not self._pending:
                if self._stopping:
                    return
                await changed.wait()
                continue
            if self._inflight >= self._capacity():
                await changed.wait()
                continue
            key, wake = self._next_group(loop.time())
            if key is None:
                timer = loop.call_at(wake, changed.set) if wake is not None else None
                await changed.wait()
                if timer is not None:
                    timer.cancel()
                continue
            batch = self._take(key)
            self._inflight += 1
            self._last_launch_requests = len(batch)
            task = asyncio.create_task(self._launch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _scheduler_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("the batch scheduler stopped", exc_info=task.exception())
        error = RunnerError(f"the batch scheduler failed: {task.exception()}")
        for group in list(self._groups.values()):
            for request in list(group):
                self._remove(request)
                self._fail(request, error)
        self._stopping = True

    # -- launch ------------------------------------------------------------------------------
    async def _launch(self, batch: list[_Request]) -> None:
        start_ns = time.perf_counter_ns()
        try:
            hooks = self._hooks
            assert hooks is not None, "start() the batcher first"
            padded = self._padded_length(batch)
            feeds = hooks.prepare([(r.feeds, r.rows) for r in batch], padded)
            infer_ns = time.perf_counter_ns()
            outputs, device_ns = await self.pool.run_timed(feeds)
            output_ns = time.perf_counter_ns()
            results = hooks.split(outputs, [(r.rows, r.seq_len) for r in batch], padded)
            end_ns = time.perf_counter_ns()
        except Exception as exc:
            error = exc if isinstance(exc, TrtpipeError) else RunnerError(f"batch failed: {exc}")
            if not isinstance(exc, TrtpipeError):
                log.exception("batch of %d request(s) failed", len(batch))
            for request in batch:
                self._fail(request, error)
        else:
            rows = sum(r.rows for r in batch)
            self.launch_costs.record(rows * padded, device_ns / 1e9)
            stats = self.stats
            stats.record_execution(rows, output_ns - infer_ns)
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
                stats.queue_ns += start_ns - request.arrival_ns
                stats.compute_input_ns += infer_ns - start_ns
                stats.compute_infer_ns += output_ns - infer_ns
                stats.compute_output_ns += end_ns - output_ns
        finally:
            self._inflight -= 1
            self._notify()

    def _padding_hooks(self, layout: Layout) -> BatchHooks:
        right = self.config.padding_side == "right"
        return PaddingHooks(layout, self.config.pad_token_ids, right)

    def _padded_length(self, batch: list[_Request]) -> int:
        """The batch's one length, else its longest rounded up to ``bucket_multiple``."""
        lengths = [r.seq_len for r in batch]
        limit = self._layout.max_seq if self._layout is not None else None
        return padded_length(min(lengths), max(lengths), self.config.bucket_multiple, limit)

    def _fail(self, request: _Request, error: BaseException) -> None:
        request.state = "done"
        if request.timer is not None:
            request.timer.cancel()
        if not request.future.done():
            request.future.set_exception(error)
            self.stats.request_failure += 1

    def _expire(self, request: _Request) -> None:
        if request.future.done():
            return
        where = "in the queue" if request.state == "queued" else "while running"
        self._remove(request)
        self.stats.timeouts += 1
        self._fail(
            request,
            RequestTimeoutError(
                f"request not answered within {self.config.timeout_s:g} s (expired {where}, "
                f"{self._pending} waiting); raise --timeout or add devices"
            ),
        )
        self._notify()
