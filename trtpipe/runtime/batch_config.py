"""The dynamic batcher's options (``batcher.DynamicBatcher``), checked once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from trtpipe.errors import InputError
from trtpipe.runtime.batch_plan import CPU_MAX_PADDING_SHARE


def _default_pads() -> dict[str, int]:
    return {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}


@dataclass
class BatcherConfig:
    """Batching options; ``None`` batch size means the engine's profile maximum."""

    max_batch_size: int | None = None
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024
    timeout_s: float | None = 30.0
    pad_token_ids: dict[str, int] = field(default_factory=_default_pads)
    padding_side: str = "right"
    bucket_multiple: int = 8
    # Launch the oldest request with its nearest neighbours in length (False: in arrival order).
    group_by_length: bool = True
    max_padding_share: float = CPU_MAX_PADDING_SHARE
    # Also stop growing a launch once the next request's padding would cost more than the
    # launch overhead it shares (the overhead learnt from the batcher's launches: launch_cost).
    learn_launch_cost: bool = True
    # Skip the queue delay when the last launch carried one request and nothing else waits,
    # so a lone client is not charged the delay; under load batching behaves as configured.
    adaptive_delay: bool = True
    max_inflight_batches: int | None = None

    def validate(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise InputError(f"max batch size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0:
            raise InputError(f"max queue delay must be >= 0 ms, got {self.max_queue_delay_ms}")
        if self.max_queue_size < 1:
            raise InputError(f"max queue size must be >= 1, got {self.max_queue_size}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise InputError(f"timeout must be > 0 s (or none), got {self.timeout_s}")
        if self.padding_side not in ("right", "left"):
            raise InputError(f"padding side must be right or left, got {self.padding_side!r}")
        if self.bucket_multiple < 1:
            raise InputError(f"bucket multiple must be >= 1, got {self.bucket_multiple}")
        if not 0.0 <= self.max_padding_share < 1.0:
            raise InputError(f"max padding share must be in [0, 1), got {self.max_padding_share}")
        if self.max_inflight_batches is not None and self.max_inflight_batches < 1:
            raise InputError("max in-flight batches must be >= 1")
