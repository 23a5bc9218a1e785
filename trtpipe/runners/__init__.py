"""Runners: one small class per backend behind one interface (see base.Runner)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError

if TYPE_CHECKING:
    from trtpipe.runners.base import Runner


def runner_for(engine: EngineDir | str, device: Device | Sequence[Device] | None = None) -> Runner:
    """The runner matching the engine's backend, not yet loaded.

    A pipeline-stage engine is one runner over a device group (one device per stage, see
    ``trtpipe.devices.stage_devices``); other engines take one device.
    """
    engine_dir = engine if isinstance(engine, EngineDir) else EngineDir(engine)
    if engine_dir.manifest.stages:
        from trtpipe.devices import stage_devices
        from trtpipe.runners.pipeline import PipelineRunner

        group = stage_devices(device, len(engine_dir.manifest.stages))
        return PipelineRunner(engine_dir, group)
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
        from trtpipe.runners.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(engine_dir, device)
    if backend == "tensorrt":
        from trtpipe.runners.tensorrt import TensorRTRunner

        return TensorRTRunner(engine_dir, device)
    raise InputError(f"no runner for backend {backend!r}")
