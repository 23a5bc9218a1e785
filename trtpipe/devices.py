"""Device names: ``cpu``, ``cpu:N`` (N CPU workers), ``cuda:I`` / GPU index lists."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from trtpipe.errors import BackendUnavailableError, InputError


@dataclass(frozen=True)
class Device:
    """One place a runner is loaded: ``kind`` is ``cpu`` or ``cuda``; ``index`` the ordinal."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}"

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"


def parse_device(text: str) -> Device:
    """``cpu`` / ``cpu:0`` / ``cuda`` / ``cuda:1`` / ``1`` -> Device."""
    value = text.strip().lower()
    if value.isdigit():
        return Device("cuda", int(value))
    kind, _, index = value.partition(":")
    if kind == "gpu":
        kind = "cuda"
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise InputError(f"bad device {text!r}: use cpu, cpu:N, cuda:I or a GPU index")
    return Device(kind, int(index) if index else 0)


def parse_gpus(text: str) -> list[Device]:
    """``0,1`` -> [cuda:0, cuda:1]."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise InputError(f"bad --gpus {text!r}: use comma-separated GPU indices such as 0,1")
    if len(set(parts)) != len(parts):
        raise InputError(f"--gpus {text!r} names a GPU twice")
    return [Device("cuda", int(p)) for p in parts]


def parse_devices(text: str) -> list[Device]:
    """``cpu:2`` -> two CPU workers; ``cuda:0,cuda:1`` -> those GPUs; ``cpu`` -> one worker."""
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    if not parts:
        raise InputError("--devices is empty: use cpu:N or cuda:0,cuda:1")
    if len(parts) == 1 and parts[0].startswith("cpu"):
        _, _, count = parts[0].partition(":")
        if count and (not count.isdigit() or int(count) < 1):
            raise InputError(f"bad --devices {text!r}: cpu:N needs N >= 1")
        return [Device("cpu", i) for i in range(int(count) if count else 1)]
    devices = [parse_device(p) for p in parts]
    if len(set(devices)) != len(devices):
        raise InputError(f"--devices {text!r} names a device twice")
    return devices


def pipeline_groups(devices: list[Device], stages: int) -> list[list[Device]]:
    """Cut a device list into pipeline replicas of ``stages`` consecutive devices each.

    ``cuda:0,cuda:1,cuda:2,cuda:3`` with 2 stages -> [[cuda:0, cuda:1], [cuda:2, cuda:3]].
    """
    if stages < 1 or not devices or len(devices) % stages:
        raise InputError(
            f"{len(devices)} device(s) ({', '.join(str(d) for d in devices)}) do not divide into "
            f"pipeline replicas of {stages} stages: give a multiple of {stages} devices"
        )
    return [devices[i : i + stages] for i in range(0, len(devices), stages)]


def stage_devices(device: Device | Sequence[Device] | None, stages: int) -> list[Device]:
    """The device group of one pipeline replica.

    A list must name one device per stage. One device names the group that starts there:
    ``cpu:0`` with 3 stages -> cpu:0, cpu:1, cpu:2 (CPU workers sharing the cores);
    ``cuda:2`` with 2 stages -> cuda:2, cuda:3.
    """
    if device is None:
        device = Device("cpu", 0)
    if isinstance(device, Device):
        return [Device(device.kind, device.index + i) for i in range(stages)]
    group = list(device)
    if len(group) != stages or len(set(group)) != len(group):
        raise InputError(
            f"a pipeline replica of this engine needs {stages} different devices (one per "
            f"stage), got {len(group)}: {', '.join(str(d) for d in group)}"
        )
    return group


def cpu_cores() -> int:
    """Cores this process may run on (its affinity), which CPU workers share."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cuda_device_count() -> int:
    """Number of CUDA devices visible through cuda-python (0 without a driver or GPU)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return 0
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0:
        return 0
    return int(count)


def require_visible(device: Device) -> None:
    """Refuse a GPU this machine does not have, in one line, before a library tries it (and
    prints pages of its own errors)."""
    if not device.is_gpu:
        return
    count = cuda_device_count()
    if count == 0:
        # Name the cause (a driver older than cuda-python's runtime, no driver, cuda-python
        # missing), not only its symptom.
        from trtpipe.cuda import unusable_reason

        reason = unusable_reason() or "no CUDA-capable device is detected"
        raise BackendUnavailableError(
            f"{device} requested but no CUDA GPU is usable here: {reason}; "
            "use the CPU (--devices cpu:N, --device cpu)"
        )
    if device.index >= count:
        raise BackendUnavailableError(
            f"{device} requested but only {count} CUDA GPU(s) are visible "
            f"(cuda:0..cuda:{count - 1})"
        )
