"""The decoder session for an engine's backend: the one place that knows every backend.

Kept apart from ``kv_cache`` (the ONNX Runtime session and the shared contract) so the TensorRT
session can build on that contract without the two modules importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import BackendUnavailableError, InputError
from trtpipe.generation.kv_cache import DecoderSession, OrtDecoderSession


def decoder_session(
    engine: EngineDir | str,
    device: Device | Sequence[Device] | None = None,
    threads: int | None = None,
) -> DecoderSession:
    """The decoder session for the engine's backend (not yet loaded).

    A pipeline-stage engine gets one session over a device group (one device per stage, see
    ``trtpipe.devices.stage_devices``: one device names the group that starts there).
    """
    engine_dir = engine if isinstance(engine, EngineDir) else EngineDir(engine)
    if engine_dir.manifest.stages:
        from trtpipe.devices import stage_devices
        from trtpipe.generation.staged_session import StagedDecoderSession

        group = stage_devices(device, len(engine_dir.manifest.stages))
        return StagedDecoderSession(engine_dir, group, threads)
    if device is not None and not isinstance(device, Device):
        if len(device) != 1:
            raise InputError(
                f"{engine_dir.path} is one engine: give one device, not "
                f"{', '.join(str(d) for d in device)} (build with --pipeline-stages to split it)"
            )
        device = device[0]
    device = device or Device("cpu", 0)
    backend = engine_dir.manifest.backend
    if backend == "onnxruntime":
        return OrtDecoderSession(engine_dir, device, threads)
    if backend == "tensorrt":
        from trtpipe.generation.tensorrt import TensorRTDecoderSession  # needs tensorrt

        return TensorRTDecoderSession(engine_dir, device)
    raise BackendUnavailableError(f"no decoder session for backend {backend!r}")


def session_places(engine: EngineDir, devices: Sequence[Device]) -> list[list[Device]]:
    """Where each decoder session goes: one device each, or for a pipeline-stage engine one
    replica's device group each (the list cut into groups of the stage count; a single device
    names the group that starts there)."""
    stages = len(engine.manifest.stages)
    if not stages:
        return [[device] for device in devices]
    from trtpipe.devices import pipeline_groups, stage_devices

    if len(devices) == 1:
        return [stage_devices(devices[0], stages)]
    return pipeline_groups(list(devices), stages)
