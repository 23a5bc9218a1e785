"""The requests that wait for a launch, grouped so that only requests that fit one launch meet.

Kept apart from the batcher (``batcher.py``), which decides *when* to launch and answers each
request; this module only holds what waits and picks a launch's requests out of a group.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtpipe.runtime.batch_plan import nearest_lengths


@dataclass(eq=False)
class QueuedRequest:
    """One request (batch dim ``rows``) on its way through the batcher."""

    feeds: dict[str, np.ndarray]
    rows: int
    seq_len: int
    key: tuple[Any, ...]  # requests share a launch only within one key (input signature)
    future: asyncio.Future[dict[str, np.ndarray]]
    arrival: float  # loop time, seconds
    arrival_ns: int
    state: str = "queued"  # queued -> running -> done
    timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True)
class LengthPlan:
    """How a launch picks the oldest request's nearest neighbours in length (``batch_plan``)."""

    max_padding_share: float
    bucket_multiple: int
    max_seq: int | None
    overhead_positions: float | None  # learnt launch overhead; None: not learnt


class RequestQueue:
    """Waiting requests by key, oldest first in each group, with their row counts."""

    def __init__(self) -> None:
        self._groups: dict[tuple[Any, ...], deque[QueuedRequest]] = {}
        self._rows: dict[tuple[Any, ...], int] = {}
        self.pending = 0

    def add(self, request: QueuedRequest) -> None:
        self._groups.setdefault(request.key, deque()).append(request)
        self._rows[request.key] = self._rows.get(request.key, 0) + request.rows
        self.pending += 1

    def remove(self, request: QueuedRequest) -> None:
        """Take a request out if it is still queued (timeout, cancel, stop)."""
        if request.state != "queued":
            return
        group = self._groups.get(request.key)
        if group is None or request not in group:
            return
        group.remove(request)
        self._rows[request.key] -= request.rows
        if not group:
            del self._groups[request.key]
            del self._rows[request.key]
        self.pending -= 1
        request.state = "done"

    def waiting(self) -> Iterator[QueuedRequest]:
        """Every queued request (a copy: removing while iterating is fine)."""
        return iter([r for group in self._groups.values() for r in group])

    def next_ready(
        self, now: float, delay: float, full_rows: int, flush: bool
    ) -> tuple[tuple[Any, ...] | None, float | None]:
        """(the key whose head waited longest of those ready, or None; when the next head's wait
        of ``delay`` ends). A group is ready when it holds ``full_rows`` rows, when its head has
        waited ``delay``, or always when ``flush`` (stopping)."""
        ready: tuple[float, tuple[Any, ...]] | None = None
        wake: float | None = None
        for key, group in self._groups.items():
            head = group[0]
            deadline = head.arrival + delay
            if flush or deadline <= now or self._rows[key] >= full_rows:
                if ready is None or head.arrival < ready[0]:
                    ready = (head.arrival, key)
            elif wake is None or deadline < wake:
                wake = deadline
        return (ready[1] if ready else None), wake

    def take(
        self, key: tuple[Any, ...], max_rows: int, batchable: bool, plan: LengthPlan | None
    ) -> list[QueuedRequest]:
        """The group's oldest request plus those that share its launch, marked running: its
        nearest neighbours in length when there is a ``plan``, else the next ones in order while
        they fit ``max_rows`` (only the head when the model cannot batch)."""
        group = self._groups[key]
        if len(group) == 1:  # a lone request (concurrency 1): nothing to plan
            return self._detach(key, [group[0]], deque())
        if plan is not None and batchable:
            listed = list(group)
            picked = nearest_lengths(
                [r.seq_len for r in listed],
                [r.rows for r in listed],
                max_rows,
                plan.max_padding_share,
                plan.bucket_multiple,
                plan.max_seq,
                plan.overhead_positions,
            )
            chosen = set(picked)
            left = deque(r for i, r in enumerate(listed) if i not in chosen)
            return self._detach(key, [listed[i] for i in picked], left)
        head = group.popleft()
        batch, rows, left = [head], head.rows, deque[QueuedRequest]()
        while group:
            request = group.popleft()
            if batchable and rows + request.rows <= max_rows:
                batch.append(request)
                rows += request.rows
            else:
                left.append(request)
            if rows >= max_rows:
                break
        left.extend(group)
        return self._detach(key, batch, left)

    def _detach(
        self, key: tuple[Any, ...], batch: list[QueuedRequest], left: deque[QueuedRequest]
    ) -> list[QueuedRequest]:
        if left:
            self._groups[key] = left
            self._rows[key] -= sum(r.rows for r in batch)
        else:
            del self._groups[key]
            del self._rows[key]
        self.pending -= len(batch)
        for request in batch:
            request.state = "running"
        return batch
