"""Dynamic batcher with a recording fake runner: rows back, padding, limits, queue, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from trtpipe.devices import Device
from trtpipe.engine import ShapeRange, TensorSpec
from trtpipe.errors import InputError, RunnerError
from trtpipe.runners.base import Runner
from trtpipe.runtime import (
    BatcherConfig,
    BatcherStoppedError,
    DevicePool,
    DynamicBatcher,
    QueueFullError,
    RequestTimeoutError,
)

SEQ = ["batch", "sequence"]
INPUTS = [
    TensorSpec("input_ids", "int64", [-1, -1], SEQ),
    TensorSpec("attention_mask", "int64", [-1, -1], SEQ),
]
OUTPUTS = [
    TensorSpec("token_out", "int64", [-1, -1], SEQ),
    TensorSpec("sentence", "int64", [-1], ["batch"]),
]
PROFILE = {name: ShapeRange([1, 1], [4, 16], [8, 64]) for name in ("input_ids", "attention_mask")}


class RecordingRunner(Runner):
    """Test double: a masked toy model that records the shape of every launch.

    ``token_out = 10 * ids + mask`` (shows where padding went) and ``sentence = sum(ids * mask)``
    (padding-invariant, like a pooled embedding). Can hold a launch until a gate opens, or fail.
    """

    backend = "fake"

    def __init__(self, device: Device, launches: list[tuple[str, tuple[int, ...]]]):
        super().__init__(device)
        self.launches = launches
        self.gate: threading.Event | None = None
        self.fail = False

    @property
    def inputs(self) -> list[TensorSpec]:
        return INPUTS

    @property
    def outputs(self) -> list[TensorSpec]:
        return OUTPUTS

    @property
    def profile(self) -> dict[str, ShapeRange]:
        return PROFILE

    def load(self) -> None:
        self.loaded = True

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        assert ids.shape == mask.shape
        self.launches.append((str(self.device), ids.shape))
        if self.gate is not None:
            assert self.gate.wait(5), "test gate never released"
        if self.fail:
            raise RunnerError(f"injected fault on {self.device}")
        return {"token_out": 10 * ids + mask, "sentence": (ids * mask).sum(axis=1)}


class Harness:
    def __init__(self, devices: int = 1, **config: Any):
        self.launches: list[tuple[str, tuple[int, ...]]] = []
        self.runners: dict[int, RecordingRunner] = {}

        def factory(device: Device) -> Runner:
            runner = RecordingRunner(device, self.launches)
            self.runners[device.index] = runner
            return runner

        self.pool = DevicePool(factory, [Device("cpu", i) for i in range(devices)])
        self.pool.start()
        self.batcher = DynamicBatcher(self.pool, BatcherConfig(**config))

    def hold(self, index: int = 0) -> threading.Event:
        gate = threading.Event()
        self.runners[index].gate = gate
        return gate

    def rows_per_launch(self) -> list[int]:
        return [shape[0] for _, shape in self.launches]


def run(harness: Harness, scenario: Callable[[DynamicBatcher], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        await harness.batcher.start()
        try:
            return await scenario(harness.batcher)
        finally:
            for runner in harness.runners.values():
                if runner.gate is not None:
                    runner.gate.set()
            await harness.batcher.stop()

    try:
        return asyncio.run(main())
    finally:
        harness.pool.close()


def request(seed: int, rows: int, length: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1, 1000, size=(rows, length), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def check(feeds: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    ids = feeds["input_ids"]
    np.testing.assert_array_equal(out["token_out"], 10 * ids + 1)
    np.testing.assert_array_equal(out["sentence"], ids.sum(axis=1))


def run_lengths(harness: Harness, lengths: list[int]) -> None:
    """One single-row request per length, all submitted at once; each reply is its own rows."""
    reqs = [request(i, 1, n) for i, n in enumerate(lengths)]

    async def scenario(batcher: DynamicBatcher) -> None:
        outs = await asyncio.gather(*(batcher.submit(r) for r in reqs))
        for feeds, out in zip(reqs, outs, strict=True):
            check(feeds, out)

    run(harness, scenario)


def test_concurrent_requests_of_mixed_lengths_each_get_their_own_rows() -> None:
    harness = Harness(devices=2, max_queue_delay_ms=5)
    rng = np.random.default_rng(0)
    reqs = [request(i, int(rng.integers(1, 4)), int(rng.integers(1, 65))) for i in range(48)]
    # Each device holds its first launch until both have one: an instant fake runner on a fast
    # CPU could otherwise let one device thread take every batch from the shared queue.
    gates = [harness.hold(0), harness.hold(1)]

    async def scenario(batcher: DynamicBatcher) -> list[dict[str, np.ndarray]]:
        replies = [asyncio.ensure_future(batcher.submit(r)) for r in reqs]
        deadline = time.monotonic() + 4
        while len({d for d, _ in harness.launches}) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        for gate in gates:
            gate.set()
        return list(await asyncio.gather(*replies))

    outs = run(harness, scenario)
    for feeds, out in zip(reqs, outs, strict=True):
        check(feeds, out)
    stats = harness.batcher.stats
    total_rows = sum(r["input_ids"].shape[0] for r in reqs)
    assert stats.request_success == 48 and stats.request_failure == 0
    assert stats.inference_count == total_rows == sum(harness.rows_per_launch())
    assert stats.execution_count == len(harness.launches) < 48
    assert stats.average_batch_size > 1
    assert max(harness.rows_per_launch()) <= 8
    # a launch is padded to a multiple of 8 unless its requests share one length; length
    # groups keep the padding well under half the tokens; both devices were used
    lengths = {r["input_ids"].shape[1] for r in reqs}
    assert all(shape[1] % 8 == 0 or shape[1] in lengths for _, shape in harness.launches)
    assert 0 < stats.padding_ratio < 0.5
    assert {device for device, _ in harness.launches} == {"cpu:0", "cpu:1"}
    assert stats.queue_ns > 0 and stats.compute_infer_ns > 0
    assert sum(b.count for b in stats.batch_sizes.values()) == stats.execution_count


def test_never_more_than_max_batch_size_rows_per_launch() -> None:
    harness = Harness(max_batch_size=3, max_queue_delay_ms=20)
    reqs = [request(i, 1 + i % 3, 8) for i in range(12)]

    async def scenario(batcher: DynamicBatcher) -> None:
        outs = await asyncio.gather(*(batcher.submit(r) for r in reqs))
        for feeds, out in zip(reqs, outs, strict=True):
            check(feeds, out)
        with pytest.raises(InputError, match="4 rows; this model takes at most 3"):
            await batcher.submit(request(99, 4, 8))

    run(harness, scenario)
    assert max(harness.rows_per_launch()) == 3
    assert sum(harness.rows_per_launch()) == sum(1 + i % 3 for i in range(12))


def test_max_batch_size_is_capped_at_the_profile_maximum() -> None:
    harness = Harness(max_batch_size=100)

    async def scenario(batcher: DynamicBatcher) -> int:
        return batcher.max_batch_size

    assert run(harness, scenario) == 8


def test_short_and_long_requests_are_launched_apart_and_padded_to_buckets() -> None:
    # GPU-style rule: lengths rounded up to 8, up to half of a launch may be padding
    harness = Harness(
        max_queue_delay_ms=30, adaptive_delay=False, bucket_multiple=8, max_padding_share=0.5
    )
    lengths = [3, 5, 60, 6, 50, 2]
    reqs = [request(i, 1, n) for i, n in enumerate(lengths)]

    async def scenario(batcher: DynamicBatcher) -> None:
        outs = await asyncio.gather(*(batcher.submit(r) for r in reqs))
        for feeds, out in zip(reqs, outs, strict=True):
            check(feeds, out)
            assert out["token_out"].shape == feeds["input_ids"].shape

    run(harness, scenario)
    # the short ones padded to 8, the long ones to 64 (60 -> 64)
    assert sorted(shape for _, shape in harness.launches) == [(2, 64), (4, 8)]
    assert harness.batcher.stats.padded_tokens == (8 * 4 - 16) + (128 - 110)


def test_cpu_rule_launches_near_lengths_together_with_little_padding() -> None:
    # CPU rule: exact longest, at most 10% padding; the oldest request is in the first launch
    harness = Harness(
        max_queue_delay_ms=30, adaptive_delay=False, bucket_multiple=1, max_padding_share=0.1
    )
    run_lengths(harness, [20, 40, 21, 5, 39, 19, 6, 41])
    assert harness.launches[0][1] == (3, 21)  # 20 (oldest), 21, 19
    assert sorted(shape for _, shape in harness.launches) == [(2, 6), (3, 21), (3, 41)]
    stats = harness.batcher.stats
    assert stats.padded_tokens == (63 - 60) + (123 - 120) + (12 - 11)
    assert stats.padding_ratio < 0.1


@pytest.mark.parametrize("learn", [True, False])
def test_learnt_launch_cost_keeps_padding_that_costs_more_than_it_saves_out(learn: bool) -> None:
    harness = Harness(
        max_queue_delay_ms=30,
        adaptive_delay=False,
        bucket_multiple=1,
        max_padding_share=0.1,
        learn_launch_cost=learn,
    )
    for positions in range(10, 400, 3):  # launches so far: 0.6 ms + 80 us per position
        harness.batcher.launch_costs.record(positions, 0.6e-3 + 80e-6 * positions)
    run_lengths(harness, [28, 28, 27, 29, 25])
    if learn:  # 28, 28, 27 first; the 29 would pad three rows to save a 7.5-position launch
        assert [shape for _, shape in harness.launches] == [(3, 28), (2, 29)]
    else:  # padding alone (5.5%) lets all five share one launch
        assert [shape for _, shape in harness.launches] == [(5, 29)]
    assert harness.batcher.launch_costs.launches == 130 + len(harness.launches)


def test_a_lone_request_launches_without_fitting_the_launch_cost() -> None:
    """At concurrency 1 there is nothing to plan, so the loop skips the launch-cost fit; two
    requests queued together are planned with it."""
    harness = Harness(max_queue_delay_ms=30, adaptive_delay=False, learn_launch_cost=True)
    costs = harness.batcher.launch_costs
    for positions in range(10, 400, 3):
        costs.record(positions, 0.6e-3 + 80e-6 * positions)
    fitted = costs.overhead_positions
    calls: list[float | None] = []

    def counted() -> float | None:
        calls.append(fitted())
        return calls[-1]

    costs.overhead_positions = counted  # type: ignore[method-assign]

    async def scenario(batcher: DynamicBatcher) -> None:
        for seed in range(3):  # one at a time: each launches alone
            check(feeds := request(seed, 1, 12), await batcher.submit(feeds))
        assert calls == []
        pair = [request(7, 1, 12), request(8, 1, 12)]
        for feeds, out in zip(pair, await asyncio.gather(*map(batcher.submit, pair)), strict=True):
            check(feeds, out)

    run(harness, scenario)
    assert len(calls) == 1 and calls[0] is not None and calls[0] > 0  # the pair was planned
    assert harness.rows_per_launch() == [1, 1, 1, 2]


def test_left_padding_cuts_per_token_outputs_from_the_right_place() -> None:
    harness = Harness(
        max_queue_delay_ms=30, adaptive_delay=False, padding_side="left", max_padding_share=0.9
    )
    reqs = [request(1, 2, 3), request(2, 1, 7)]
    captured: dict[str, np.ndarray] = {}
    runner_infer = RecordingRunner._infer

    def spy(self: RecordingRunner, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captured.update(feeds)
        return runner_infer(self, feeds)

    async def scenario(batcher: DynamicBatcher) -> None:
        outs = await asyncio.gather(*(batcher.submit(r) for r in reqs))
        for feeds, out in zip(reqs, outs, strict=True):
            check(feeds, out)

    RecordingRunner._infer = spy  # type: ignore[method-assign]
    try:
        run(harness, scenario)
    finally:
        RecordingRunner._infer = runner_infer  # type: ignore[method-assign]
    assert harness.launches == [("cpu:0", (3, 8))]
    np.testing.assert_array_equal(captured["attention_mask"][0], [0] * 5 + [1] * 3)
    np.testing.assert_array_equal(captured["attention_mask"][2], [0] + [1] * 7)
    np.testing.assert_array_equal(captured["input_ids"][2, 1:], reqs[1]["input_ids"][0])


def test_bad_requests_fail_at_once_and_never_reach_a_device() -> None:
    harness = Harness()
    good = request(0, 1, 4)

    async def scenario(batcher: DynamicBatcher) -> None:
        cases = [
            ({"input_ids": good["input_ids"]}, "missing input"),
            ({**good, "extra": good["input_ids"]}, "unknown input"),
            ({**good, "input_ids": good["input_ids"].astype(np.float32)}, "dtype float32"),
            (request(1, 1, 65), "outside the engine's profile"),
            ({**good, "attention_mask": np.ones((1, 5), np.int64)}, "disagree"),
            (request(2, 9, 4), "outside the engine's profile"),
        ]
        for feeds, message in cases:
            with pytest.raises(InputError, match=message):
                await batcher.submit(feeds)
        check(good, await batcher.submit(good))

    run(harness, scenario)
    assert harness.launches == [("cpu:0", (1, 4))]
    assert harness.batcher.stats.request_failure == 6
    assert harness.batcher.stats.request_success == 1


def test_full_queue_is_rejected_quickly() -> None:
    harness = Harness(max_queue_size=4, max_queue_delay_ms=0)

    async def scenario(batcher: DynamicBatcher) -> None:
        gate = harness.hold()
        # fill the device and the batch prepared ahead of it
        first = [asyncio.ensure_future(batcher.submit(request(k, 8, 4))) for k in (0, 10)]
        await asyncio.sleep(0.05)
        assert batcher.pending == 0 and batcher.inflight_batches == 2
        queued = [asyncio.ensure_future(batcher.submit(request(i, 1, 4))) for i in range(1, 5)]
        await asyncio.sleep(0.01)
        assert batcher.pending == 4
        started = time.perf_counter()
        with pytest.raises(QueueFullError, match="queue is full"):
            await batcher.submit(request(9, 1, 4))
        assert time.perf_counter() - started < 0.05
        gate.set()
        for k, task in zip((0, 10), first, strict=True):
            check(request(k, 8, 4), await task)
        for i, task in enumerate(queued, start=1):
            check(request(i, 1, 4), await task)

    run(harness, scenario)
    assert harness.batcher.stats.rejected_queue_full == 1
    assert harness.batcher.stats.request_success == 6


def test_request_waiting_too_long_times_out() -> None:
    harness = Harness(timeout_s=0.2)

    async def scenario(batcher: DynamicBatcher) -> float:
        gate = harness.hold()
        # the device and the batch prepared ahead of it are full
        busy = [asyncio.ensure_future(batcher.submit(request(k, 8, 4))) for k in (0, 10)]
        await asyncio.sleep(0.02)
        started = time.perf_counter()
        with pytest.raises(RequestTimeoutError, match=r"within 0\.2 s .*in the queue"):
            await batcher.submit(request(1, 1, 4))
        waited = time.perf_counter() - started
        gate.set()
        await asyncio.gather(*busy, return_exceptions=True)
        return waited

    waited = run(harness, scenario)
    assert 0.15 < waited < 1.0
    assert harness.batcher.stats.timeouts >= 1
    # the timed-out request never reached the device
    assert all(shape[0] == 8 for _, shape in harness.launches)


def test_graceful_stop_refuses_new_requests_and_finishes_accepted_ones() -> None:
    harness = Harness(max_batch_size=2, max_queue_delay_ms=0)
    reqs = [request(i, 1, 4 + i) for i in range(6)]

    async def main() -> None:
        batcher = harness.batcher
        await batcher.start()
        gate = harness.hold()
        tasks = [asyncio.ensure_future(batcher.submit(r)) for r in reqs]
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(batcher.stop(drain=True))
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherStoppedError, match="not accepting"):
            await batcher.submit(request(9, 1, 4))
        assert not stopping.done()  # still draining
        gate.set()
        await stopping
        for feeds, task in zip(reqs, tasks, strict=True):
            assert task.done()
            check(feeds, task.result())

    try:
        asyncio.run(main())
    finally:
        harness.pool.close()
    assert harness.batcher.stats.request_success == 6
    assert sum(harness.rows_per_launch()) == 6


def test_stop_without_drain_fails_the_queued_requests() -> None:
    harness = Harness(max_batch_size=1, max_queue_delay_ms=0)

    async def main() -> list[Any]:
        batcher = harness.batcher
        await batcher.start()
        gate = harness.hold()
        tasks = [asyncio.ensure_future(batcher.submit(request(i, 1, 4))) for i in range(4)]
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(batcher.stop(drain=False))
        await asyncio.sleep(0.01)
        gate.set()
        await stopping
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        harness.pool.close()
    # running and prepared ahead (already launched): finished; still queued: refused
    check(request(0, 1, 4), results[0])
    check(request(1, 1, 4), results[1])
    assert all(isinstance(r, BatcherStoppedError) for r in results[2:])


@pytest.mark.parametrize("policy", ["shared_queue", "round_robin"])
def test_a_failing_device_fails_only_its_own_batch(policy: str) -> None:
    """cpu:1 fails the one batch it holds and nothing else: a batch round-robin dealt to cpu:1
    while that batch was failing goes to cpu:0, and cpu:1's failure is counted once. Gates
    order the events, so the outcome is the same on a loaded machine."""
    harness = Harness(devices=2, max_batch_size=2, max_queue_delay_ms=0)
    harness.pool.retry_on_failure = False
    harness.pool.policy = policy
    harness.pool.reload_backoff = None  # one fault, cpu:1 stays down
    harness.runners[1].fail = True
    reached = threading.Semaphore(0)

    class Turnstile(threading.Event):
        """A gate that also tells the test a launch reached it."""

        def wait(self, timeout: float | None = None) -> bool:
            reached.release()
            return super().wait(timeout)

    gates = {index: Turnstile() for index in (0, 1)}
    for index, gate in gates.items():
        harness.runners[index].gate = gate
    reqs = [request(i, 1, 4) for i in range(8)]

    async def until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.002)

    async def scenario(batcher: DynamicBatcher) -> tuple[list[Any], int]:
        tasks = [asyncio.ensure_future(batcher.submit(r)) for r in reqs]
        for _ in range(2):  # one launch on each device, both held at their gates
            assert await asyncio.to_thread(reached.acquire, True, 10)
        held = next(shape[0] for device, shape in harness.launches if device == "cpu:1")
        gates[0].set()  # cpu:0 runs what it gets; cpu:1 stays inside the batch that will fail
        if policy == "round_robin":  # the old race: a later batch dealt to cpu:1 behind it
            await until(lambda: harness.pool.devices_status()[1]["inflight"] == 2, "a deal")
        else:
            await until(lambda: sum(t.done() for t in tasks) == len(reqs) - held, "cpu:0")
        gates[1].set()
        results = list(await asyncio.gather(*tasks, return_exceptions=True))
        assert harness.pool.ready
        assert [s["healthy"] for s in harness.pool.devices_status()] == [True, False]
        assert [s["failures"] for s in harness.pool.devices_status()] == [0, 1]
        return results, held

    results, held = run(harness, scenario)
    failed = [r for r in results if isinstance(r, Exception)]
    assert len(failed) == held and 1 <= held <= 2  # exactly the batch cpu:1 held
    assert all(isinstance(r, RunnerError) and "injected fault on cpu:1" in str(r) for r in failed)
    for feeds, result in zip(reqs, results, strict=True):
        if not isinstance(result, Exception):
            check(feeds, result)
    assert harness.batcher.stats.request_failure == len(failed)


def test_delay_collects_a_batch_but_a_lone_client_does_not_wait() -> None:
    async def lone(batcher: DynamicBatcher) -> float:
        await batcher.submit(request(0, 1, 4))
        started = time.perf_counter()
        for i in range(3):
            await batcher.submit(request(i, 1, 4))
        return (time.perf_counter() - started) / 3

    assert run(Harness(max_queue_delay_ms=150), lone) < 0.1
    assert run(Harness(max_queue_delay_ms=150, adaptive_delay=False), lone) >= 0.15

    harness = Harness(max_queue_delay_ms=100, adaptive_delay=False)

    async def trickle(batcher: DynamicBatcher) -> None:
        tasks = []
        for i in range(3):
            tasks.append(asyncio.ensure_future(batcher.submit(request(i, 1, 4))))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)

    run(harness, trickle)
    assert harness.rows_per_launch() == [3]


def test_bad_config_is_an_input_error() -> None:
    with pytest.raises(InputError, match="padding side"):
        BatcherConfig(padding_side="middle").validate()
    with pytest.raises(InputError, match="max queue size"):
        BatcherConfig(max_queue_size=0).validate()


def test_a_fault_in_forming_batches_fails_the_queued_requests_instead_of_hanging() -> None:
    """Batches are formed in a loop callback: if that callback raises (a bug), the queued
    requests get a clear error and the batcher refuses more, rather than leaving them waiting."""
    harness = Harness(devices=1, max_queue_delay_ms=0)

    def broken(*args: Any) -> Any:
        raise ValueError("planning bug")

    async def main() -> tuple[list[Any], bool]:
        batcher = harness.batcher
        await batcher.start()
        batcher._queue.next_ready = broken  # type: ignore[method-assign]
        try:
            submits = (batcher.submit(request(i, 1, 4)) for i in range(3))
            results = await asyncio.wait_for(
                asyncio.gather(*submits, return_exceptions=True), timeout=10
            )
            return list(results), batcher.running
        finally:
            await batcher.stop(drain=False)

    try:
        results, running = asyncio.run(main())
    finally:
        harness.pool.close()
    assert all(isinstance(r, RunnerError) and "planning bug" in str(r) for r in results)
    assert not running
    assert harness.launches == []
