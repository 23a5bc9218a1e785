"""One runner per device, each on its own worker thread, taking batches as it frees up.

Policies: ``shared_queue`` (the default) puts every batch in one queue and whichever healthy
device is free takes the next one (work stealing, as Triton and Infinity do), so no batch waits
behind a slow one while another device idles. ``round_robin`` deals batches in turn and
``least_busy`` to the device with the fewest batches dealt and running.

A device never runs two batches at once (its runner lives on one thread, which is also what CUDA
contexts and TensorRT execution contexts want). A runner that fails mid-batch is marked unhealthy
at once, on its own thread: batches already dealt to it go to healthy devices (not their fault,
so no retry is used up and no failure counted), and the failed batch is retried once on another
device when allowed. Unhealthy devices are reloaded in the background with exponential backoff
(``healing.Backoff``), and readiness follows. The pool knows nothing about backends: it only
calls ``runner_factory(device)``, ``load``, ``infer`` and ``close``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from trtpipe.devices import Device, cpu_cores
from trtpipe.engine import EngineDir, Manifest, ShapeRange, TensorSpec
from trtpipe.errors import InputError, RunnerError
from trtpipe.runners.base import Runner
from trtpipe.runtime import device_worker as states
from trtpipe.runtime.device_worker import DeviceWorker, Job, batch_rows, close_quietly
from trtpipe.runtime.healing import (
    DEFAULT_BACKOFF,
    Backoff,
    describe,
    is_user_error,
    log_reload_plan,
)

log = logging.getLogger(__name__)

POLICIES = ("shared_queue", "round_robin", "least_busy")
DEFAULT_POLICY = "shared_queue"

__all__ = ["DEFAULT_POLICY", "POLICIES", "Backoff", "DevicePool", "batch_rows", "cpu_cores"]

T = TypeVar("T")


class DevicePool:
    """Runners on several devices behind one ``run(feeds)``; see the module docstring.

    ``reload_backoff=None`` turns background reloading off (``revive()`` still reloads).
    """

    def __init__(
        self,
        runner_factory: Callable[[Device], Runner],
        devices: list[Device],
        policy: str = DEFAULT_POLICY,
        retry_on_failure: bool = True,
        manifest: Manifest | None = None,
        reload_backoff: Backoff | None = DEFAULT_BACKOFF,
    ):
        if not devices:
            raise InputError("the device pool needs at least one device")
        if len(set(devices)) != len(devices):
            raise InputError(f"devices {[str(d) for d in devices]} name a device twice")
        if policy not in POLICIES:
            raise InputError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        self.runner_factory = runner_factory
        self.policy = policy
        self.retry_on_failure = retry_on_failure
        self.manifest = manifest
        self.reload_backoff = reload_backoff
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # any device's health changed
        self._workers = [DeviceWorker(i, d, self._lock) for i, d in enumerate(devices)]
        self._shared: deque[Job] = deque()
        self._next = 0
        self._started = False
        self._closing = False

    @classmethod
    def for_engine(
        cls,
        engine: EngineDir | str | Path,
        devices: list[Device],
        policy: str = DEFAULT_POLICY,
        retry_on_failure: bool = True,
        threads_per_cpu_worker: int | None = None,
        reload_backoff: Backoff | None = DEFAULT_BACKOFF,
        share_cpu_session: bool = True,
    ) -> DevicePool:
        """A pool of the engine's runner on each device (pipeline-stage engines: one replica
        per group of stage-count devices); see ``engine_runners`` for the CPU threads and the
        one session CPU workers share."""
        from trtpipe.runtime.engine_runners import engine_runner_factory

        engine_dir = engine if isinstance(engine, EngineDir) else EngineDir(engine)
        factory, slots = engine_runner_factory(
            engine_dir, devices, threads_per_cpu_worker, share_cpu_session
        )
        return cls(
            factory,
            slots,
            policy,
            retry_on_failure,
            manifest=engine_dir.manifest,
            reload_backoff=reload_backoff,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start one thread per device and load every runner; raise if no device loaded."""
        if self._closing:
            raise RunnerError("the device pool is closed")
        if self._started:
            return
        with self._lock:
            loads = [(w, self._call(w, partial(self._reload, w))) for w in self._workers]
        for worker in self._workers:
            worker.thread = threading.Thread(
                target=self._serve, args=(worker,), name=f"trtpipe-{worker.device}", daemon=True
            )
            worker.thread.start()
        failures = [(w, e) for w, e in ((w, f.result()) for w, f in loads) if e is not None]
        self._started = True
        if not self.ready:
            self.close()
            user_errors = [e for _, e in failures if is_user_error(e)]
            if failures and len(user_errors) == len(failures):
                # The same mistake on every device (no GPU, wrong engine): say it once.
                raise user_errors[0]
            errors = "; ".join(f"{w.device}: {w.last_error}" for w in self._workers)
            raise RunnerError(f"no device could load the engine ({errors})")
        loaded = [str(w.device) for w in self._workers if w.healthy]
        log.info("device pool ready on %s (policy %s)", ", ".join(loaded), self.policy)

    def revive(self) -> list[str]:
        """Reload unhealthy devices now (even those given up on); returns those healthy again."""
        with self._lock:
            if not self._started or self._closing:
                return []
            targets = [w for w in self._workers if not w.healthy]
            loads = [self._call(w, partial(self._reload, w)) for w in targets]
        for future in loads:
            future.result()
        return [str(w.device) for w in targets if w.healthy]

    def wait_healthy(self, count: int = 1, timeout: float | None = None) -> bool:
        """Block until ``count`` devices are healthy (True) or ``timeout`` passes (False)."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._closing or sum(w.healthy for w in self._workers) >= count, timeout
            )
            return not self._closing and sum(w.healthy for w in self._workers) >= count

    def close(self) -> None:
        """Finish the batches already taken, close every runner on its thread; idempotent."""
        with self._lock:
            self._closing = True
            for worker in self._workers:
                worker.wake()
            self._changed.notify_all()
        for worker in self._workers:
            if worker.thread is not None and worker.thread is not threading.current_thread():
                worker.thread.join()

    def __enter__(self) -> DevicePool:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- introspection -----------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._started

    @property
    def ready(self) -> bool:
        """At least one healthy device."""
        return not self._closing and any(w.healthy for w in self._workers)

    @property
    def devices(self) -> list[Device]:
        return [w.device for w in self._workers]

    @property
    def healthy_count(self) -> int:
        return sum(1 for w in self._workers if w.healthy)

    @property
    def waiting_rows(self) -> int:
        """Rows of the batches handed to the pool that no device has started yet."""
        with self._lock:
            jobs = [*self._shared, *(job for w in self._workers for job in w.dealt)]
            return sum(batch_rows(job.feeds, self.inputs) for job in jobs)

    def devices_status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [w.status() for w in self._workers]

    def _spec_source(self) -> Manifest | Runner:
        if self.manifest is not None:
            return self.manifest
        for worker in self._workers:
            if worker.runner is not None:
                return worker.runner
        raise RunnerError("the device pool has no loaded runner yet; call start() first")

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._spec_source().inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._spec_source().outputs

    @property
    def profile(self) -> dict[str, ShapeRange]:
        return self._spec_source().profile

    @property
    def max_batch_size(self) -> int:
        return self._spec_source().max_batch_size

    # -- running a batch -----------------------------------------------------------------------
    async def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One already-batched launch on the next free healthy device (awaitable)."""
        outputs, _ = await self.run_timed(feeds)
        return outputs

    async def run_timed(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """:meth:`run`, plus the nanoseconds the device's runner took (no queueing)."""
        job = self.submit(feeds)
        outputs = await asyncio.wrap_future(job.future)
        return outputs, job.device_ns

    def run_sync(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Same as :meth:`run`, blocking, for code without an event loop."""
        return self.submit(feeds).future.result()

    def submit(self, feeds: dict[str, np.ndarray]) -> Job:
        """Hand one already-batched launch to a device; ``job.future`` resolves on its thread."""
        job = Job(feeds)
        with self._lock:
            if not self._started or self._closing:
                raise RunnerError("the device pool is not running; call start() first")
            if self.policy == "shared_queue":
                if not any(w.healthy for w in self._workers):
                    raise self._no_device_error()
                self._shared.append(job)
                idle = next((w for w in self._workers if w.idle and w.healthy), None)
                if idle is not None:
                    idle.wake()  # else a busy device takes it when it finishes
            elif not self._deal(job):
                raise self._no_device_error()
        return job

    def _deal(self, job: Job) -> bool:
        """Give the job to one healthy device it has not failed on (lock held); False if none."""
        count = len(self._workers)
        order = [(self._next + k) % count for k in range(count)]
        candidates = [i for i in order if self._workers[i].healthy and i not in job.tried]
        if not candidates:
            return False
        if self.policy == "round_robin":
            chosen = candidates[0]
        else:  # least busy; min() keeps the first of equals, so ties go round-robin
            chosen = min(candidates, key=lambda i: self._workers[i].inflight)
        self._next = (chosen + 1) % count
        worker = self._workers[chosen]
        worker.dealt.append(job)
        worker.wake()
        return True

    def _no_device_error(self) -> RunnerError:
        failed = "; ".join(f"{w.device}: {w.last_error}" for w in self._workers if w.last_error)
        return RunnerError(f"no healthy device left to run the batch ({failed or 'none'})")

    # -- the device's own thread ---------------------------------------------------------------
    def _call(self, worker: DeviceWorker, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the device's thread before its next batch (lock held)."""
        future: Future[T] = Future()
        worker.controls.append((fn, future))
        worker.wake()
        return future

    def _serve(self, worker: DeviceWorker) -> None:
        """The device's thread: controls first, then dealt batches, then the shared queue."""
        while True:
            with self._lock:
                kind, item = self._next_work(worker)
            if kind == "control":
                fn, future = item
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            elif kind == "batch":
                self._execute(worker, item)
            elif kind == "reload":
                self._reload(worker)
            else:
                self._close_runner(worker)
                return

    def _next_work(self, worker: DeviceWorker) -> tuple[str, Any]:
        """Wait (lock held) for the device's next thing to do."""
        while True:
            if worker.controls:
                return "control", worker.controls.popleft()
            if worker.dealt:
                worker.running = True
                return "batch", worker.dealt.popleft()
            if worker.healthy and self._shared:
                worker.running = True
                return "batch", self._shared.popleft()
            if self._closing:
                return "exit", None
            timeout = None
            if worker.reload_at is not None:
                timeout = worker.reload_at - time.monotonic()
                if timeout <= 0:
                    worker.reload_at = None
                    return "reload", None
            worker.idle = True
            worker.wakeup.wait(timeout)
            worker.idle = False

    def _execute(self, worker: DeviceWorker, job: Job) -> None:
        if not job.started:
            job.started = True
            if not job.future.set_running_or_notify_cancel():  # the caller gave up waiting
                with self._lock:
                    worker.running = False
                return
        runner = worker.runner
        try:
            if runner is None:
                raise RunnerError(f"{worker.device} has no runner")  # never dealt one; defensive
            start = time.perf_counter_ns()
            outputs = runner.infer(job.feeds)
            elapsed = time.perf_counter_ns() - start
        except InputError as exc:  # the caller's mistake: the device stays healthy
            with self._lock:
                worker.running = False
            job.future.set_exception(exc)
        except Exception as exc:
            self._batch_failed(worker, job, exc)
        else:
            with self._lock:
                worker.running = False
                worker.executions += 1
                worker.inferences += batch_rows(job.feeds, runner.inputs)
                worker.compute_ns += elapsed
                worker.failures_in_a_row = 0
            job.device_ns = elapsed
            job.future.set_result(outputs)

    def _batch_failed(self, worker: DeviceWorker, job: Job, exc: Exception) -> None:
        """Mark the device unhealthy, move its dealt batches, retry or fail this one."""
        message = describe(exc)
        failed: list[tuple[Job, RunnerError]] = []
        with self._lock:
            worker.running = False
            worker.failures += 1
            worker.last_error = message
            delay = self._mark_unhealthy(worker, exc)
            job.tried.add(worker.index)
            retried = self.retry_on_failure and len(job.tried) == 1 and self._deal(job)
            if not retried:
                error = RunnerError(f"{worker.device} failed: {message}")
                error.__cause__ = exc
                failed.append((job, error))
            moved = list(worker.dealt)
            worker.dealt.clear()
            for other in moved:
                if not self._deal(other):
                    failed.append((other, self._no_device_error()))
            if not any(w.healthy for w in self._workers):
                failed += [(j, self._no_device_error()) for j in self._shared]
                self._shared.clear()
        log.error("%s failed a batch and is marked unhealthy: %s", worker.device, message)
        if retried:
            log.info("retrying the batch from %s on another device", worker.device)
        if moved:
            log.info("%d batch(es) dealt to %s go to other devices", len(moved), worker.device)
        log_reload_plan(worker.device, exc, delay, worker.failures_in_a_row)
        for other, error in failed:
            other.future.set_exception(error)

    def _mark_unhealthy(self, worker: DeviceWorker, exc: BaseException) -> float | None:
        """Unhealthy, and when to reload (lock held); returns the delay, None for no reload."""
        worker.healthy = False
        worker.failures_in_a_row += 1
        worker.reload_at = None
        self._changed.notify_all()
        if is_user_error(exc):
            worker.state = states.FAILED
            return None
        worker.state = states.UNHEALTHY
        if self.reload_backoff is None:
            return None
        delay = self.reload_backoff.delay(worker.failures_in_a_row)
        worker.reload_at = time.monotonic() + delay
        return delay

    def _reload(self, worker: DeviceWorker) -> Exception | None:
        """(Re)load the device's runner on its own thread; returns the error or None."""
        with self._lock:
            first = worker.state == states.LOADING
            if not first:
                worker.state = states.RELOADING
            worker.reload_at = None
            old, worker.runner = worker.runner, None
        if old is not None:
            close_quietly(old, worker.device)
        runner: Runner | None = None
        try:
            runner = self.runner_factory(worker.device)
            runner.load()
        except Exception as exc:
            if runner is not None:
                close_quietly(runner, worker.device)
            with self._lock:
                worker.last_error = describe(exc)
                delay = self._mark_unhealthy(worker, exc)
            verb = "failed to load" if first else "failed to reload"
            log.error("%s %s: %s", worker.device, verb, worker.last_error)
            log_reload_plan(worker.device, exc, delay, worker.failures_in_a_row)
            return exc
        with self._lock:
            worker.runner = runner
            worker.healthy = True
            worker.state = states.HEALTHY
            if not first:
                worker.reloads += 1
            self._changed.notify_all()
        if not first:
            log.info("%s is healthy again", worker.device)
        return None

    def _close_runner(self, worker: DeviceWorker) -> None:
        with self._lock:
            runner, worker.runner = worker.runner, None
            worker.healthy = False
            worker.state = states.CLOSED
            worker.reload_at = None
        if runner is not None:
            close_quietly(runner, worker.device)
