"""Triton/KServe documents about a served model: metadata, model configuration, statistics.

The front ends send these as JSON (HTTP) or protobuf (gRPC); Triton tools (tritonclient,
perf_analyzer, dashboards) read the field names, so they follow Triton's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from trtpipe.engine import Manifest, TensorSpec
from trtpipe.server.protocol import v2_datatype
from trtpipe.server.validation import TEXT_INPUT

VERSION = "1"


@dataclass
class Counter:
    """Triton's ``{"count", "ns"}`` pair: how many requests and their cumulative time."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class ServedFacts(Protocol):
    """What the documents read from a served model (trtpipe.server.served_model.ServedModel)."""

    name: str
    version: str
    manifest: Manifest
    config: Any
    success: Counter
    failure: Counter
    last_inference_ms: int

    @property
    def inputs(self) -> list[TensorSpec]: ...
    @property
    def outputs(self) -> list[TensorSpec]: ...
    @property
    def is_text_model(self) -> bool: ...
    @property
    def max_sequence_length(self) -> int | None: ...
    @property
    def max_batch_size(self) -> int: ...
    @property
    def pending(self) -> int: ...
    def batcher_stats(self) -> dict[str, Any]: ...
    def devices_status(self) -> list[dict[str, Any]]: ...


def model_metadata(model: ServedFacts) -> dict[str, Any]:
    """KServe v2 model metadata (plus the text input a text model accepts)."""
    doc: dict[str, Any] = {
        "name": model.name,
        "versions": [model.version],
        "platform": platform_name(model.manifest.backend),
        "inputs": [tensor_metadata(s) for s in model.inputs],
        "outputs": [tensor_metadata(s) for s in model.outputs],
    }
    if model.is_text_model:
        doc["parameters"] = {
            "text_input": {"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]},
            "max_sequence_length": model.max_sequence_length,
            "task": model.manifest.task,
        }
    return doc


def model_config(model: ServedFacts) -> dict[str, Any]:
    """The Triton model-config fields that perf_analyzer and tritonclient read."""
    devices = model.config.encoder_devices()
    gpus = [d.index for d in devices if d.is_gpu]
    cpus = [d for d in devices if not d.is_gpu]
    groups: list[dict[str, Any]] = []
    if gpus:
        groups.append({"name": f"{model.name}_gpu", "kind": "KIND_GPU", "count": 1, "gpus": gpus})
    if cpus:
        groups.append({"name": f"{model.name}_cpu", "kind": "KIND_CPU", "count": len(cpus)})
    return {
        "name": model.name,
        "platform": platform_name(model.manifest.backend),
        "backend": model.manifest.backend,
        "max_batch_size": model.max_batch_size,
        "input": [config_tensor(s) for s in model.inputs],
        "output": [config_tensor(s) for s in model.outputs],
        "dynamic_batching": {
            "preferred_batch_size": [model.max_batch_size],
            "max_queue_delay_microseconds": int(model.config.max_queue_delay_ms * 1000),
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": int(model.config.timeout_s * 1e6),
                "max_queue_size": model.config.max_queue_size,
            },
        },
        "instance_group": groups,
        "version_policy": {"latest": {"num_versions": 1}},
        "parameters": {
            "precision": {"string_value": model.manifest.precision},
            "task": {"string_value": model.manifest.task},
        },
    }


def model_statistics(model: ServedFacts) -> dict[str, Any]:
    """Triton statistics-extension document for this model.

    ``success``/``fail`` count requests as the front ends saw them (one HTTP/gRPC request
    each); queue and compute figures come from the batcher, charged per batched request.
    """
    stats = model.batcher_stats()
    answered = int(stats.get("request_success", 0))

    def duration(key: str) -> dict[str, int]:
        return {"count": answered, "ns": int(stats.get(key, 0))}

    batch_sizes = stats.get("batch_sizes", {}) or {}
    return {
        "name": model.name,
        "version": model.version,
        "last_inference": model.last_inference_ms,
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        "inference_stats": {
            "success": model.success.to_dict(),
            "fail": model.failure.to_dict(),
            "queue": duration("queue_ns"),
            "compute_input": duration("compute_input_ns"),
            "compute_infer": duration("compute_infer_ns"),
            "compute_output": duration("compute_output_ns"),
            "cache_hit": {"count": 0, "ns": 0},
            "cache_miss": {"count": 0, "ns": 0},
        },
        "batch_stats": [
            {
                "batch_size": int(size),
                "compute_infer": {"count": entry["count"], "ns": entry["compute_ns"]},
            }
            for size, entry in sorted(batch_sizes.items(), key=lambda kv: int(kv[0]))
        ],
        "memory_usage": [],
        "pending_request_count": model.pending,
        "average_batch_size": stats.get("average_batch_size", 0.0),
        # trtpipe's own: sequence positions launched for real tokens and for padding.
        "tokens": {
            "real": int(stats.get("real_tokens", 0)),
            "padding": int(stats.get("padded_tokens", 0)),
        },
        # The launch overhead the batcher has learnt, in sequence positions (null: not yet).
        "launch_overhead_positions": stats.get("launch_overhead_positions"),
        "devices": model.devices_status(),
    }


def platform_name(backend: str) -> str:
    return {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}.get(backend, backend)


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": v2_datatype(spec.dtype), "shape": list(spec.shape)}


def config_tensor(spec: TensorSpec) -> dict[str, Any]:
    """Triton config entry: dims without the batch dimension."""
    dims = list(spec.shape[1:]) if spec.dims and spec.dims[0] == "batch" else list(spec.shape)
    return {"name": spec.name, "data_type": "TYPE_" + triton_type(spec.dtype), "dims": dims}


def triton_type(dtype: str) -> str:
    name = v2_datatype(dtype)
    return {"BYTES": "STRING"}.get(name, name)
