"""Runners: one small class per backend behind one interface (see base.Runner)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError

if TYPE_CHECKING:
    from trtpipe.runners.base import Runner


def runner_for(engine: EngineDir | str, device: Device | None = None) -> Runner:
    """The runner matching the engine's backend, not yet loaded."""
    engine_dir = engine if isinstance(engine, EngineDir) else EngineDir(engine)
    device = device or Device("cpu", 0)
    backend = engine_dir.manifest.backend
    if backend == "onnxruntime":
        from trtpipe.runners.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(engine_dir, device)
    if backend == "tensorrt":
        from trtpipe.runners.tensorrt import TensorRTRunner

        return TensorRTRunner(engine_dir, device)
    raise InputError(f"no runner for backend {backend!r}")
