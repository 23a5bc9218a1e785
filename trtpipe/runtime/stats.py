"""Batcher statistics named after Triton's, so the server can expose them as nv_inference_*.

Durations are cumulative nanoseconds charged per request, as Triton does: every request of a
batch is charged that batch's compute time, so ``compute_infer_ns / request_success`` is the
mean compute time a request saw. ``execution_count`` counts launches and ``inference_count``
rows, so ``inference_count / execution_count`` is the average executed batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BatchSizeStats:
    """Launches of one batch size (rows) and their total compute time."""

    count: int = 0
    compute_ns: int = 0


@dataclass
class BatcherStats:
    request_success: int = 0
    request_failure: int = 0
    rejected_queue_full: int = 0
    timeouts: int = 0
    inference_count: int = 0
    execution_count: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    success_ns: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    batch_sizes: dict[int, BatchSizeStats] = field(default_factory=dict)

    @property
    def compute_ns(self) -> int:
        """Input assembly + inference + output split, per request, cumulative."""
        return self.compute_input_ns + self.compute_infer_ns + self.compute_output_ns

    @property
    def average_batch_size(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0

    @property
    def padding_ratio(self) -> float:
        """Share of launched sequence positions that were padding."""
        total = self.padded_tokens + self.real_tokens
        return self.padded_tokens / total if total else 0.0

    def record_execution(self, rows: int, compute_ns: int) -> None:
        self.execution_count += 1
        self.inference_count += rows
        entry = self.batch_sizes.setdefault(rows, BatchSizeStats())
        entry.count += 1
        entry.compute_ns += compute_ns

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["batch_sizes"] = {str(k): asdict(v) for k, v in sorted(self.batch_sizes.items())}
        data["compute_ns"] = self.compute_ns
        data["average_batch_size"] = self.average_batch_size
        data["padding_ratio"] = self.padding_ratio
        return data
