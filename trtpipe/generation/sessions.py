"""The decoder session for an engine's backend: the one place that knows every backend.

Kept apart from ``kv_cache`` (the ONNX Runtime session and the shared contract) so the TensorRT
session can build on that contract without the two modules importing each other.
"""

from __future__ import annotations

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import BackendUnavailableError
from trtpipe.generation.kv_cache import DecoderSession, OrtDecoderSession


def decoder_session(
    engine: EngineDir | str, device: Device | None = None, threads: int | None = None
) -> DecoderSession:
    """The decoder session for the engine's backend (not yet loaded)."""
    engine_dir = engine if isinstance(engine, EngineDir) else EngineDir(engine)
    device = device or Device("cpu", 0)
    backend = engine_dir.manifest.backend
    if backend == "onnxruntime":
        return OrtDecoderSession(engine_dir, device, threads)
    if backend == "tensorrt":
        from trtpipe.generation.tensorrt import TensorRTDecoderSession  # needs tensorrt

        return TensorRTDecoderSession(engine_dir, device)
    raise BackendUnavailableError(f"no decoder session for backend {backend!r}")
