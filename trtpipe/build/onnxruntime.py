"""ONNX Runtime "engine": the typed graph optimized offline for its execution provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trtpipe.errors import BuildError

ENGINE_FILE = "model.ort.onnx"


def build_onnxruntime(typed_onnx: Path, out_dir: Path, config: Any) -> tuple[str, dict[str, Any]]:
    """Optimize ``typed_onnx`` for the target provider and save it as the engine file."""
    import onnxruntime as ort

    from trtpipe.runners.onnxruntime import providers_for

    device = config.device
    target = "cuda" if device is not None and device.is_gpu else "cpu"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # EXTENDED fusions are provider-specific but portable across machines of the same provider;
    # ALL would add CPU layout transforms that a CUDA session cannot load.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out_dir / ENGINE_FILE)
    try:
        from trtpipe.devices import Device

        ort.InferenceSession(
            str(typed_onnx), options, providers=providers_for(device or Device("cpu"))
        )
    except Exception as exc:
        raise BuildError(f"ONNX Runtime could not optimize {typed_onnx.name}: {exc}") from exc
    return ENGINE_FILE, {
        "versions": {"onnxruntime": ort.__version__},
        "device": {"kind": target},
        "execution_provider": "CUDAExecutionProvider"
        if target == "cuda"
        else "CPUExecutionProvider",
    }
