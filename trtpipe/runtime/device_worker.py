"""What the device pool keeps per device and per batch; the pool's lock guards all of it.

Kept apart from ``pool.py`` so the pool reads as dispatch and healing, not bookkeeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from trtpipe.devices import Device
from trtpipe.engine import TensorSpec
from trtpipe.runners.base import Runner

log = logging.getLogger(__name__)

# Device states shown in ``devices_status()``.
LOADING = "loading"  # first load in progress
HEALTHY = "healthy"  # takes batches
UNHEALTHY = "unhealthy"  # failed; a reload is scheduled, or reloading is off
RELOADING = "reloading"  # a reload after a failure is in progress
FAILED = "failed"  # a configuration error at load: not retried until revive()
CLOSED = "closed"


class Job:
    """One already-batched launch on its way to a device; ``tried`` names devices that failed it."""

    __slots__ = ("device_ns", "feeds", "future", "started", "tried")

    def __init__(self, feeds: dict[str, np.ndarray]):
        self.feeds = feeds
        self.future: Future[dict[str, np.ndarray]] = Future()
        self.started = False
        self.tried: set[int] = set()
        self.device_ns = 0  # the runner's time for the launch that answered it


class DeviceWorker:
    """One device: its runner, its thread, the batches dealt to it, its health and counters."""

    def __init__(self, index: int, device: Device, lock: threading.Lock):
        self.index = index
        self.device = device
        self.wakeup = threading.Condition(lock)
        self.thread: threading.Thread | None = None
        self.runner: Runner | None = None
        self.state = LOADING
        self.healthy = False
        self.dealt: deque[Job] = deque()  # batches dealt to this device (round_robin, retries)
        self.controls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()  # load, revive
        self.running = False
        self.idle = False  # waiting for work; cleared by whoever wakes it
        self.executions = 0
        self.inferences = 0
        self.failures = 0  # batches this device failed (a real fault, once each)
        self.failures_in_a_row = 0  # load or batch failures since the last good batch
        self.reloads = 0
        self.compute_ns = 0
        self.last_error: str | None = None
        self.reload_at: float | None = None  # time.monotonic() of the next background reload

    @property
    def inflight(self) -> int:
        """Batches dealt to this device and not finished (running or waiting for it)."""
        return len(self.dealt) + int(self.running)

    def wake(self) -> None:
        """Call with the pool's lock held."""
        self.idle = False
        self.wakeup.notify()

    def status(self) -> dict[str, Any]:
        """Call with the pool's lock held."""
        reload_in = None
        if self.reload_at is not None:
            reload_in = round(max(0.0, self.reload_at - time.monotonic()), 3)
        return {
            "device": str(self.device),
            # CPU workers' intra-op threads (None on GPUs), and those of a launch that runs
            # while no other worker does (the wide shared session): a client comparing the
            # server against a direct call needs the same layout (bench --url --texts does).
            "threads": None if self.device.is_gpu else getattr(self.runner, "threads", None),
            "alone_threads": (
                None if self.device.is_gpu else getattr(self.runner, "alone_threads", None)
            ),
            "healthy": self.healthy,
            "state": self.state,
            "executions": self.executions,
            "inferences": self.inferences,
            "failures": self.failures,
            "last_error": self.last_error,
            "busy": self.inflight > 0,
            "inflight": self.inflight,
            "compute_ns": self.compute_ns,
            "reloads": self.reloads,
            "next_reload_s": reload_in,
        }


def batch_rows(feeds: dict[str, np.ndarray], inputs: list[TensorSpec]) -> int:
    """Rows in an already-batched launch (first dim of the first batched input)."""
    for spec in inputs:
        if spec.dims and spec.dims[0] == "batch" and spec.name in feeds:
            return int(np.shape(feeds[spec.name])[0])
    return 1


def close_quietly(runner: Runner, device: Device) -> None:
    """A broken runner may fail to close; it is dropped anyway."""
    try:
        runner.close()
    except Exception:
        log.warning("closing the runner on %s failed", device, exc_info=True)
