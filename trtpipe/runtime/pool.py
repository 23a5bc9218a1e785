"""One runner per device, each on its own worker thread, with batches dealt across them.

A device never runs two batches at once (its runner lives on one thread, which is also what
CUDA contexts and TensorRT execution contexts want). A runner that fails mid-batch is marked
unhealthy and skipped; the batch is retried once on another device when one is left. The pool
knows nothing about backends: it only calls ``runner_factory(device)``, ``load``, ``infer`` and
``close``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.devices import Device, cpu_cores
from trtpipe.engine import EngineDir, Manifest, ShapeRange, TensorSpec
from trtpipe.errors import InputError, RunnerError, TrtpipeError
from trtpipe.runners.base import Runner

log = logging.getLogger(__name__)

POLICIES = ("round_robin", "least_busy")


class _Worker:
    """One device: its runner, its single thread and its counters."""

    def __init__(self, device: Device):
        self.device = device
        self.runner: Runner | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"trtpipe-{device}")
        self.healthy = False
        self.executions = 0
        self.inferences = 0
        self.failures = 0
        self.inflight = 0
        self.compute_ns = 0
        self.last_error: str | None = None

    def status(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "healthy": self.healthy,
            "executions": self.executions,
            "inferences": self.inferences,
            "failures": self.failures,
            "last_error": self.last_error,
            "busy": self.inflight > 0,
            "inflight": self.inflight,
            "compute_ns": self.compute_ns,
        }


def batch_rows(feeds: dict[str, np.ndarray], inputs: list[TensorSpec]) -> int:
    """Rows in an already-batched launch (first dim of the first batched input)."""
    for spec in inputs:
        if spec.dims and spec.dims[0] == "batch" and spec.name in feeds:
            return int(np.shape(feeds[spec.name])[0])
    return 1


class DevicePool:
    """Runners on several devices behind one ``run(feeds)``; see the module docstring."""

    def __init__(
        self,
        runner_factory: Callable[[Device], Runner],
        devices: list[Device],
        policy: str = "round_robin",
        retry_on_failure: bool = True,
        manifest: Manifest | None = None,
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
        self._workers = [_Worker(d) for d in devices]
        self._lock = threading.Lock()
        self._next = 0
        self._started = False
        self._closed = False

    @classmethod
    def for_engine(
        cls,
        engine: EngineDir | str | Path,
        devices: list[Device],
        policy: str = "round_robin",
        retry_on_failure: bool = True,
        threads_per_cpu_worker: int | None = None,
    ) -> DevicePool:
        """A pool of the engine's runner on each device.

        N CPU workers share the machine's cores: each gets ``cores // N`` intra-op threads
        unless ``threads_per_cpu_worker`` says otherwise, so workers do not oversubscribe.
        """
        from trtpipe.runners import runner_for

        engine_dir = engine if isinstance(engine, EngineDir) else EngineDir(engine)
        cpu_workers = sum(1 for d in devices if not d.is_gpu)
        threads = threads_per_cpu_worker
        if threads is None and cpu_workers:
            threads = max(1, cpu_cores() // cpu_workers)

        def factory(device: Device) -> Runner:
            runner = runner_for(engine_dir, device)
            if not device.is_gpu and hasattr(runner, "threads"):
                runner.threads = threads
            return runner

        return cls(factory, devices, policy, retry_on_failure, manifest=engine_dir.manifest)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create and load every runner on its own thread; raise if no device loaded."""
        if self._closed:
            raise RunnerError("the device pool is closed")
        if self._started:
            return
        futures = [(w, w.executor.submit(self._load, w)) for w in self._workers]
        failures = [(w, e) for w, e in ((w, self._settle_load(w, f)) for w, f in futures) if e]
        self._started = True
        if not self.ready:
            user_errors = [e for _, e in failures if _is_user_error(e)]
            if failures and len(user_errors) == len(failures):
                # The same mistake on every device (no GPU, wrong engine): say it once.
                raise user_errors[0]
            errors = "; ".join(f"{w.device}: {w.last_error}" for w in self._workers)
            raise RunnerError(f"no device could load the engine ({errors})")
        for worker, _ in failures:
            log.error("%s failed to load: %s", worker.device, worker.last_error)
        loaded = [str(w.device) for w in self._workers if w.healthy]
        log.info("device pool ready on %s (policy %s)", ", ".join(loaded), self.policy)

    def revive(self) -> list[str]:
        """Reload unhealthy devices; returns the devices that are healthy again."""
        revived = []
        futures = [
            (w, w.executor.submit(self._load, w))
            for w in self._workers
            if not w.healthy and not self._closed
        ]
        for worker, future in futures:
            if self._settle_load(worker, future) is not None:
                log.error("%s failed to load again: %s", worker.device, worker.last_error)
            if worker.healthy:
                revived.append(str(worker.device))
                log.info("%s is healthy again", worker.device)
        return revived

    def _load(self, worker: _Worker) -> None:
        if worker.runner is not None:
            try:
                worker.runner.close()
            except Exception:  # a broken runner may fail to close; we replace it anyway
                log.debug("closing the old runner on %s failed", worker.device, exc_info=True)
        worker.runner = None
        runner = self.runner_factory(worker.device)
        runner.load()
        worker.runner = runner

    def _settle_load(self, worker: _Worker, future: Future[None]) -> Exception | None:
        try:
            future.result()
        except Exception as exc:
            worker.healthy = False
            worker.last_error = _describe(exc)
            return exc
        worker.healthy = True
        return None

    def close(self) -> None:
        """Close every runner on its own thread and stop the threads; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            if worker.runner is not None:
                runner = worker.runner
                try:
                    worker.executor.submit(runner.close).result()
                except Exception:
                    log.warning("closing the runner on %s failed", worker.device, exc_info=True)
                worker.runner = None
            worker.healthy = False
            worker.executor.shutdown(wait=True)

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
        return not self._closed and any(w.healthy for w in self._workers)

    @property
    def devices(self) -> list[Device]:
        return [w.device for w in self._workers]

    @property
    def healthy_count(self) -> int:
        return sum(1 for w in self._workers if w.healthy)

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

    # -- dispatch ----------------------------------------------------------------------------
    def _select(self, exclude: set[int]) -> int | None:
        """Index of the next healthy worker by policy, ``None`` when none is left."""
        count = len(self._workers)
        with self._lock:
            order = [(self._next + k) % count for k in range(count)]
            candidates = [i for i in order if self._workers[i].healthy and i not in exclude]
            if not candidates:
                return None
            if self.policy == "least_busy":
                # min() keeps the first of equals, so ties go round-robin from ``_next``.
                chosen = min(candidates, key=lambda i: self._workers[i].inflight)
            else:
                chosen = candidates[0]
            self._next = (chosen + 1) % count
            self._workers[chosen].inflight += 1
            return chosen

    def _execute(self, index: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs on the device's own thread."""
        worker = self._workers[index]
        try:
            runner = worker.runner
            if runner is None or not worker.healthy:
                raise RunnerError(f"{worker.device} is not loaded")
            start = time.perf_counter_ns()
            outputs = runner.infer(feeds)
            elapsed = time.perf_counter_ns() - start
            with self._lock:
                worker.executions += 1
                worker.inferences += batch_rows(feeds, runner.inputs)
                worker.compute_ns += elapsed
            return outputs
        finally:
            with self._lock:
                worker.inflight -= 1

    def _submit(self, exclude: set[int], feeds: dict[str, np.ndarray]) -> tuple[int, Future[Any]]:
        if not self._started or self._closed:
            raise RunnerError("the device pool is not running; call start() first")
        index = self._select(exclude)
        if index is None:
            failed = "; ".join(f"{w.device}: {w.last_error}" for w in self._workers if w.last_error)
            raise RunnerError(f"no healthy device left to run the batch ({failed or 'none'})")
        try:
            return index, self._workers[index].executor.submit(self._execute, index, feeds)
        except RuntimeError as exc:  # executor shut down between select and submit
            with self._lock:
                self._workers[index].inflight -= 1
            raise RunnerError(f"the device pool is closing: {exc}") from exc

    def _failed(self, index: int, exc: BaseException, tried: set[int]) -> None:
        """Mark the device unhealthy; raise unless a retry on another device is allowed."""
        worker = self._workers[index]
        message = _describe(exc)
        with self._lock:
            worker.failures += 1
            worker.healthy = False
            worker.last_error = message
        log.error("%s failed a batch and is marked unhealthy: %s", worker.device, message)
        tried.add(index)
        may_retry = self.retry_on_failure and len(tried) == 1
        if not may_retry or not any(
            w.healthy and i not in tried for i, w in enumerate(self._workers)
        ):
            raise RunnerError(f"{worker.device} failed: {message}") from exc
        log.info("retrying the batch from %s on another device", worker.device)

    async def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One already-batched launch on the next healthy device (awaitable)."""
        tried: set[int] = set()
        while True:
            index, future = self._submit(tried, feeds)
            try:
                return await asyncio.wrap_future(future)
            except InputError:
                raise
            except Exception as exc:
                self._failed(index, exc, tried)

    def run_sync(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Same as :meth:`run`, blocking, for code without an event loop."""
        tried: set[int] = set()
        while True:
            index, future = self._submit(tried, feeds)
            try:
                return future.result()
            except InputError:
                raise
            except Exception as exc:
                self._failed(index, exc, tried)


def _is_user_error(exc: BaseException) -> bool:
    """A mistake the user fixes (options, engine dir), not a device that broke."""
    return isinstance(exc, TrtpipeError) and not isinstance(exc, RunnerError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TrtpipeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
