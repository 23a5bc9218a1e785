"""Runtime: a pool of runners (one per device) and a dynamic batcher in front of it."""

from trtpipe.runtime.batcher import (
    BatcherConfig,
    BatcherStoppedError,
    DynamicBatcher,
    QueueFullError,
    RequestTimeoutError,
)
from trtpipe.runtime.pool import DevicePool
from trtpipe.runtime.stats import BatcherStats

__all__ = [
    "BatcherConfig",
    "BatcherStats",
    "BatcherStoppedError",
    "DevicePool",
    "DynamicBatcher",
    "QueueFullError",
    "RequestTimeoutError",
]
