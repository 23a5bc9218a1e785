"""Which runner each pool slot gets for an engine directory, and its CPU threads.

Kept apart from ``pool.py``: the pool only calls ``runner_factory(device)``; this module knows
engine directories, pipeline stages and how CPU workers share the machine's cores.
"""

from __future__ import annotations

from collections.abc import Callable

from trtpipe.devices import Device, cpu_cores, pipeline_groups
from trtpipe.engine import EngineDir
from trtpipe.runners.base import Runner


def cpu_worker_threads(devices: list[Device], given: int | None) -> int | None:
    """Intra-op threads per CPU worker: ``given``, else the cores split across the CPU workers
    (so N workers do not oversubscribe); None when no device is a CPU."""
    cpu_workers = sum(1 for d in devices if not d.is_gpu)
    if given is None and cpu_workers:
        return max(1, cpu_cores() // cpu_workers)
    return given


def engine_runner_factory(
    engine_dir: EngineDir,
    devices: list[Device],
    threads_per_cpu_worker: int | None = None,
    share_cpu_session: bool = True,
) -> tuple[Callable[[Device], Runner], list[Device]]:
    """(factory, pool slots) for ``engine_dir`` on ``devices``.

    A plain engine gets one slot per device. Its CPU workers share ONNX Runtime sessions
    (``share_cpu_session``, see ``runners.shared_session``): one session of their own threads
    that each runs its own launch on, and, with several workers, one of all the cores for a
    launch that runs alone. Pipeline-stage engines cut the device list into groups of the stage
    count, one pipeline replica per group, each slot named by its group's first device; every
    CPU stage of every replica is a CPU worker sharing the cores.
    """
    from trtpipe.runners import runner_for
    from trtpipe.runners.shared_session import SharedSession

    threads = cpu_worker_threads(devices, threads_per_cpu_worker)
    if not engine_dir.manifest.stages:
        several = sum(1 for d in devices if not d.is_gpu) > 1
        shared = SharedSession(cpu_cores() if several else None) if share_cpu_session else None

        def single(device: Device) -> Runner:
            runner = runner_for(engine_dir, device)
            if not device.is_gpu and hasattr(runner, "threads"):
                runner.threads = threads
                if hasattr(runner, "shared"):
                    runner.shared = shared
            return runner

        return single, devices

    groups = {
        group[0]: group for group in pipeline_groups(devices, len(engine_dir.manifest.stages))
    }

    def staged(device: Device) -> Runner:
        runner = runner_for(engine_dir, groups[device])
        if hasattr(runner, "threads"):
            runner.threads = threads
        return runner

    return staged, list(groups)
