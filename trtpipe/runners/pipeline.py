"""A pipeline-stage engine as one runner: stage i on device i, micro-batches flowing GPipe-style.

Each stage runs on its own thread (one per device, as CUDA contexts want). A batch is cut into
micro-batches along the batch dim; stage 0 takes micro-batch k+1 while stage 1 runs k, so every
device works once the pipeline fills. Boundary activations pass between stages as arrays (on
GPUs the stage runners stage them through host memory). Each stage's busy time is recorded, so
the bubble (the share of the batch's wall time a stage sat idle) is reported per stage.
``micro_batches=1`` is the naive schedule (accelerate's ``device_map``): one stage at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trtpipe.devices import Device, cpu_cores
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError, RunnerError, TrtpipeError
from trtpipe.runners.base import ManifestRunner, Runner

log = logging.getLogger(__name__)


@dataclass
class PipelineStats:
    """Busy seconds per stage over wall seconds, for the last batch and in total."""

    stages: int
    wall_s: float = 0.0
    busy_s: list[float] = field(default_factory=list)
    micro_batches: int = 0

    def bubble(self) -> list[float]:
        """Idle share of the wall time, per stage (0 = always busy)."""
        if self.wall_s <= 0:
            return [0.0] * self.stages
        return [max(0.0, 1.0 - busy / self.wall_s) for busy in self.busy_s]

    def add(self, other: PipelineStats) -> None:
        self.wall_s += other.wall_s
        self.busy_s = [a + b for a, b in zip(self.busy_s, other.busy_s, strict=True)]
        self.micro_batches += other.micro_batches


_STOP = object()


def free_bytes(device: Device) -> int:
    """Memory a stage can still take on ``device``: free GPU memory, or available host RAM
    (which all CPU workers share)."""
    if device.is_gpu:
        from trtpipe import cuda

        cuda.set_device(device.index)
        free, _ = cuda.check(cuda.cudart().cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free)
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_stage_memory(stages: list[dict[str, Any]], devices: list[Device]) -> None:
    """Refuse a stage whose weights alone exceed its device's free memory, before loading.

    A lower bound (activations and workspace come on top), but it turns an out-of-memory
    failure deep in a backend into one line that names the stage. CPU workers share the host's
    RAM, so their stages are counted together.
    """
    host_need = sum(
        int(st.get("weight_bytes", 0))
        for st, d in zip(stages, devices, strict=True)
        if not d.is_gpu
    )
    for i, (stage, device) in enumerate(zip(stages, devices, strict=True)):
        need = host_need if not device.is_gpu else int(stage.get("weight_bytes", 0))
        free = free_bytes(device)
        if need > free:
            what = "the CPU stages' weights" if not device.is_gpu else f"stage {i}'s weights"
            raise InputError(
                f"stage {i} (blocks {stage.get('layers')}) does not fit {device}: {what} need "
                f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free; cut the model into more "
                "stages (--pipeline-stages) or move blocks with --stage-layers"
            )


class PipelineRunner(ManifestRunner):
    """Runs a staged engine dir (``manifest.stages``) across one device per stage."""

    backend = "pipeline"

    def __init__(
        self,
        engine: EngineDir,
        devices: Sequence[Device],
        micro_batches: int | None = None,
        threads: int | None = None,
    ):
        stage_dirs = engine.stage_dirs()
        if not stage_dirs:
            raise InputError(f"{engine.path} has no pipeline stages")
        if len(devices) != len(stage_dirs):
            raise InputError(
                f"{engine.path} has {len(stage_dirs)} stages and needs {len(stage_dirs)} "
                f"devices per pipeline replica, got {len(devices)} "
                f"({', '.join(str(d) for d in devices)})"
            )
        super().__init__(engine.manifest, devices[0])
        self.engine = engine
        self.devices = list(devices)
        self.stage_dirs = stage_dirs
        self.stage_inputs = [list(s["inputs"]) for s in engine.manifest.stages]
        self.micro_batches = micro_batches if micro_batches is not None else 2 * len(stage_dirs)
        if self.micro_batches < 1:
            raise InputError("micro_batches must be >= 1")
        self.threads = threads
        # CPU stages' idle intra-op threads busy-wait (None: ONNX Runtime's default); serve
        # --no-cpu-spin sets it on every runner that has it, this one included.
        self.spin: bool | None = None
        self.stage_runners: list[Runner] = []
        self.last_stats = PipelineStats(len(stage_dirs), busy_s=[0.0] * len(stage_dirs))
        self.total_stats = PipelineStats(len(stage_dirs), busy_s=[0.0] * len(stage_dirs))
        self._queues: list[queue.Queue[Any]] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"pipeline[{','.join(str(d) for d in self.devices)}]"

    def load(self) -> None:
        from trtpipe.runners import runner_for

        check_stage_memory(self.engine.manifest.stages, self.devices)
        cpu_stages = sum(1 for d in self.devices if not d.is_gpu)
        threads = self.threads or (max(1, cpu_cores() // cpu_stages) if cpu_stages else None)
        try:
            for stage_dir, device in zip(self.stage_dirs, self.devices, strict=True):
                runner = runner_for(stage_dir, device)
                if not device.is_gpu and hasattr(runner, "threads"):
                    runner.threads = threads
                if self.spin is not None and hasattr(runner, "spin"):
                    runner.spin = self.spin
                runner.load()
                self.stage_runners.append(runner)
        except BaseException:
            self.close()
            raise
        count = len(self.stage_runners)
        self._queues = [queue.Queue() for _ in range(count + 1)]
        self._threads = [
            threading.Thread(target=self._stage_loop, args=(i,), name=f"stage-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()
        self.loaded = True
        log.debug("loaded %d stages on %s", count, self.describe())

    def _stage_loop(self, index: int) -> None:
        runner = self.stage_runners[index]
        source, sink = self._queues[index], self._queues[index + 1]
        needs = self.stage_inputs[index]
        while True:
            item = source.get()
            if item is _STOP:
                sink.put(_STOP)
                return
            k, env, busy = item
            if isinstance(env, BaseException):
                sink.put(item)
                continue
            start = time.perf_counter()
            try:
                env.update(runner.infer({name: env[name] for name in needs}))
            except BaseException as exc:  # handed to the caller's thread
                env = exc
            busy[index] += time.perf_counter() - start
            sink.put((k, env, busy))

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = next(iter(feeds.values())).shape[0]
        parts = max(1, min(self.micro_batches, batch))
        bounds = np.linspace(0, batch, parts + 1).astype(int)
        busy = [0.0] * len(self.stage_runners)
        with self._lock:  # one batch in the pipeline at a time: its stats are its own
            start = time.perf_counter()
            for k in range(parts):
                lo, hi = bounds[k], bounds[k + 1]
                env = {name: array[lo:hi] for name, array in feeds.items()}
                self._queues[0].put((k, env, busy))
            results: list[Any] = [None] * parts
            for _ in range(parts):
                item = self._queues[-1].get()
                if item is _STOP:
                    raise RunnerError(f"{self.describe()} was closed mid-batch")
                k, env, _ = item
                results[k] = env
            wall = time.perf_counter() - start
        for env in results:
            if isinstance(env, TrtpipeError):
                raise env
            if isinstance(env, BaseException):
                raise RunnerError(f"{self.describe()} failed: {env}") from env
        stats = PipelineStats(len(busy), wall, list(busy), parts)
        self.last_stats = stats
        self.total_stats.add(stats)
        names = [o.name for o in self.outputs]
        return {name: np.concatenate([env[name] for env in results], axis=0) for name in names}

    def close(self) -> None:
        if self._threads:
            self._queues[0].put(_STOP)
            for thread in self._threads:
                thread.join(timeout=10)
            self._threads = []
        for runner in self.stage_runners:
            runner.close()
        self.stage_runners = []
        super().close()
