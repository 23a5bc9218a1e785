"""The batcher assembles launches through the hooks it is given (the served model's part)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from trtpipe.engine import ShapeRange, TensorSpec
from trtpipe.runtime.batch_hooks import PaddingHooks
from trtpipe.runtime.batcher import BatcherConfig, DynamicBatcher
from trtpipe.runtime.device_worker import Job
from trtpipe.runtime.padding import Layout

IDS = TensorSpec("input_ids", "int64", [-1, -1], ["batch", "sequence"])
OUT = TensorSpec("ids_out", "int64", [-1, -1], ["batch", "sequence"])


class EchoPool:
    """Just enough of a DevicePool: echoes input_ids and keeps every launch."""

    started = True
    max_batch_size = 8
    healthy_count = 1

    def __init__(self) -> None:
        self.inputs = [IDS]
        self.outputs = [OUT]
        self.profile = {"input_ids": ShapeRange([1, 1], [4, 8], [8, 16])}
        self.launches: list[np.ndarray] = []

    def submit(self, feeds: dict[str, np.ndarray]) -> Job:
        self.launches.append(feeds["input_ids"])
        job = Job(feeds)
        job.future.set_result({"ids_out": feeds["input_ids"].copy()})
        return job


def test_launches_use_the_hooks_pad_ids_and_each_request_gets_its_rows() -> None:
    pool = EchoPool()
    made: list[Layout] = []

    def hooks(layout: Layout) -> Any:
        made.append(layout)
        return PaddingHooks(layout, {"input_ids": 99})

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(
            pool,  # type: ignore[arg-type]
            BatcherConfig(max_queue_delay_ms=50, bucket_multiple=1, group_by_length=False),
            hooks=hooks,
        )
        await batcher.start()
        try:
            return await asyncio.gather(
                batcher.submit({"input_ids": np.array([[1, 2, 3]])}),
                batcher.submit({"input_ids": np.array([[4]])}),
            )
        finally:
            await batcher.stop()

    first, second = asyncio.run(main())
    assert len(made) == 1 and made[0].batchable
    assert len(pool.launches) == 1
    np.testing.assert_array_equal(pool.launches[0], [[1, 2, 3], [4, 99, 99]])
    np.testing.assert_array_equal(first["ids_out"], [[1, 2, 3]])
    np.testing.assert_array_equal(second["ids_out"], [[4]])
