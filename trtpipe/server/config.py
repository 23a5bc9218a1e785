"""How every model is served: the ``trtpipe serve`` options that are not about sockets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trtpipe.devices import Device
from trtpipe.engine import EngineDir


@dataclass
class ServeConfig:
    """Devices, dispatch, batching and warm-up options shared by every served model."""

    devices: list[Device] = field(default_factory=lambda: [Device("cpu", 0)])
    # The default CPU layout (``trtpipe serve`` without --devices/--gpus): an encoder model on
    # the one CPU device gets a worker per core instead (``encoder_devices``).
    cpu_worker_per_core: bool = False
    policy: str = "shared_queue"
    retry_on_failure: bool = True
    max_batch_size: int | None = None
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024
    timeout_s: float = 30.0
    # Run every shape the batcher will launch once per device before the model says ready.
    warmup: bool = True
    # Replace the engine with a zero-cost runner of the same signature (front-end ceiling).
    null_runner: bool = False
    # Intra-op threads per CPU worker (None: the machine's cores split across CPU workers).
    threads_per_cpu_worker: int | None = None
    # CPU workers' idle intra-op threads busy-wait (ONNX Runtime's default) or sleep.
    cpu_spin: bool = True
    # CPU workers of one model run one ONNX Runtime session (weights once) or one each.
    share_cpu_session: bool = True
    # Largest share of a launch that may be padding (None: by device kind, see padding_rule).
    max_padding_share: float | None = None
    # Stop a launch where padding costs more than the learnt launch overhead (batch_plan).
    learn_launch_cost: bool = True

    def encoder_devices(self) -> list[Device]:
        """The devices an encoder model's pool runs on.

        ``devices``; with ``cpu_worker_per_core`` and the one default CPU device, one CPU worker
        per core. They share one session of one thread each and a wide one for a launch that
        runs alone (``runners.shared_session``), so a lone request gets every core and a loaded
        server keeps every core busy on its own launch. Generation models keep ``devices``.
        """
        if self.cpu_worker_per_core and self.devices == [Device("cpu", 0)]:
            from trtpipe.devices import cpu_cores

            return [Device("cpu", i) for i in range(cpu_cores())]
        return self.devices

    def padding_rule(self) -> tuple[int, float]:
        """(multiple the padded length is rounded up to, largest padding share of a launch).

        On CPUs time follows tokens, so launches are padded to their exact longest request and
        kept within 10% padding; GPUs keep lengths in multiples of 8 (tensor-core tiles) and
        accept more padding for bigger batches, since each launch has a fixed cost.
        """
        from trtpipe.runtime.batch_plan import CPU_MAX_PADDING_SHARE, GPU_MAX_PADDING_SHARE

        gpu = any(d.is_gpu for d in self.devices)
        share = GPU_MAX_PADDING_SHARE if gpu else CPU_MAX_PADDING_SHARE
        if self.max_padding_share is not None:
            share = self.max_padding_share
        return (8 if gpu else 1), share

    def generation(self) -> Any:
        """The continuous-batching scheduler options of a generation model (same limits)."""
        from trtpipe.generation.scheduler import SchedulerConfig

        return SchedulerConfig(self.max_batch_size, self.max_queue_size, self.timeout_s)


PoolFactory = Callable[[EngineDir, ServeConfig], Any]


def default_pool_factory(engine: EngineDir, config: ServeConfig) -> Any:
    """The engine's runner on every device; the null runner instead when asked; warmed."""
    from trtpipe.runtime.pool import DevicePool
    from trtpipe.runtime.warmup import warming_factory

    pool = DevicePool.for_engine(
        engine,
        config.encoder_devices(),
        policy=config.policy,
        retry_on_failure=config.retry_on_failure,
        threads_per_cpu_worker=config.threads_per_cpu_worker,
        share_cpu_session=config.share_cpu_session,
    )
    if not config.cpu_spin:
        make = pool.runner_factory

        def quiet_threads(device: Device) -> Any:
            runner = make(device)
            if hasattr(runner, "spin"):
                runner.spin = False
            return runner

        pool.runner_factory = quiet_threads
    if config.null_runner:
        from trtpipe.runners.null import NullRunner

        manifest = engine.manifest
        pool.runner_factory = lambda device: NullRunner(manifest, device)
    if config.warmup:
        pool.runner_factory = warming_factory(
            pool.runner_factory, engine.manifest, config.max_batch_size
        )
    return pool
