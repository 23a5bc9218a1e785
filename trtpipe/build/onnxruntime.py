"""ONNX Runtime "engine": the typed graph optimized offline for its execution provider.

Two optimization steps, both offline so a runner only loads:

- ``fuse_transformer`` (called from ``trtpipe.precision`` for fp32 and int8, before quantization,
  because dynamic INT8 must see the fused ``Attention`` op to turn it into ``QAttention``):
  ONNX Runtime's transformer optimizer fuses embeddings + LayerNorm, self-attention and
  bias + GELU into contrib ops. It finds more patterns than the session-level fusions and keeps
  fp32 results within a few 1e-6 of the source graph.
- ``build_onnxruntime``: the session-level EXTENDED optimizations for the target provider,
  saved as the engine file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

from trtpipe.errors import BuildError

log = logging.getLogger(__name__)

ENGINE_FILE = "model.ort.onnx"
# Ops the transformer optimizer produces; counted in the build record.
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "BiasGelu", "Gelu", "SkipLayerNormalization")


def attention_shape(model_dir: Path) -> tuple[int, int]:
    """(num_heads, hidden_size) from config.json; (0, 0) lets the optimizer detect them."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return 0, 0
    config = json.loads(config_file.read_text())
    heads = config.get("num_attention_heads", config.get("n_heads", 0))
    hidden = config.get("hidden_size", config.get("dim", 0))
    return int(heads or 0), int(hidden or 0)


def fuse_transformer(src: Path, dst: Path) -> dict[str, Any]:
    """Fuse attention/LayerNorm/GELU for ONNX Runtime; copy the graph unchanged if nothing fits.

    Only for the onnxruntime backend: the fused ops live in the ``com.microsoft`` domain,
    which TensorRT cannot parse.
    """
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    from trtpipe.onnx_files import save_model, too_large_for_protobuf, uses_external_data

    heads, hidden = attention_shape(src.parent)
    # Weights stay in external data beside dst when they came that way or pass 2 GB.
    external = uses_external_data(src)
    try:
        # The optimizer prints progress and shape-inference notes on stdout/stderr.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            optimized = optimize_model(
                str(src), model_type="bert", num_heads=heads, hidden_size=hidden
            )
        stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    except Exception as exc:  # the optimizer raises assorted types on unusual graphs
        log.warning("transformer fusion skipped (%s); using the graph as exported", exc)
        save_model(onnx.load(str(src)), dst, external=external or None)
        return {"transformer_fusion": False}
    optimized.save_model_to_file(
        str(dst), use_external_data_format=external or too_large_for_protobuf(optimized.model)
    )
    fused = {k: v for k, v in stats.items() if k in FUSED_OPS}
    log.info("transformer fusion: %s", fused or "no pattern matched")
    return {"transformer_fusion": bool(fused), "fused_ops": fused}


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
    from trtpipe.onnx_files import INLINE_BYTES, data_file_name, uses_external_data

    if uses_external_data(typed_onnx):
        # Over 2 GB the optimized model must keep its weights outside the protobuf; they go
        # beside the engine file, referenced relatively, so the engine dir stays self-contained.
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name",
            data_file_name(out_dir / ENGINE_FILE),
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", str(INLINE_BYTES)
        )
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
