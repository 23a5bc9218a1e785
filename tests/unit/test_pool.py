"""Device pool: dispatch order, least-busy, failure handling and readiness, with fake runners."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from trtpipe.devices import Device
from trtpipe.engine import ShapeRange, TensorSpec
from trtpipe.errors import InputError, RunnerError
from trtpipe.runners.base import Runner
from trtpipe.runtime.pool import DevicePool

INPUTS = [TensorSpec("x", "int64", [-1, -1], ["batch", "sequence"])]
OUTPUTS = [TensorSpec("y", "int64", [-1, -1], ["batch", "sequence"])]
PROFILE = {"x": ShapeRange([1, 1], [4, 8], [8, 16])}


class FakeRunner(Runner):
    """Test double: a strict runner that doubles its input and records every call.

    Refuses to run before ``load``; can be told to fail loading or a call, or to block until
    released so a test can hold a device busy.
    """

    backend = "fake"

    def __init__(
        self,
        device: Device,
        calls: list[str],
        fail_load: bool = False,
        fail_infer: bool = False,
        gate: threading.Event | None = None,
    ):
        super().__init__(device)
        self.calls = calls
        self.fail_load = fail_load
        self.fail_infer = fail_infer
        self.gate = gate
        self.threads: set[str] = set()

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
        self.threads.add(threading.current_thread().name)
        if self.fail_load:
            raise RunnerError(f"cannot load on {self.device}")
        self.loaded = True

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.add(threading.current_thread().name)
        self.calls.append(str(self.device))
        if self.gate is not None:
            assert self.gate.wait(5), "test gate never released"
        if self.fail_infer:
            raise RunnerError(f"kernel crashed on {self.device}")
        return {"y": feeds["x"] * 2}


def make_pool(
    count: int = 3,
    policy: str = "round_robin",
    retry: bool = True,
    fail_load: tuple[int, ...] = (),
    fail_infer: tuple[int, ...] = (),
    gates: dict[int, threading.Event] | None = None,
) -> tuple[DevicePool, list[str], dict[str, FakeRunner]]:
    calls: list[str] = []
    runners: dict[str, FakeRunner] = {}

    def factory(device: Device) -> Runner:
        runner = FakeRunner(
            device,
            calls,
            fail_load=device.index in fail_load,
            fail_infer=device.index in fail_infer,
            gate=(gates or {}).get(device.index),
        )
        runners[str(device)] = runner
        return runner

    devices = [Device("cpu", i) for i in range(count)]
    return DevicePool(factory, devices, policy, retry_on_failure=retry), calls, runners


def feeds(value: int = 1, rows: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 4), value, dtype=np.int64)}


def test_round_robin_deals_batches_in_turn_on_one_thread_per_device() -> None:
    pool, calls, runners = make_pool(3)
    with pool:
        for value in range(7):
            out = pool.run_sync(feeds(value))
            np.testing.assert_array_equal(out["y"], np.full((2, 4), 2 * value))
        assert calls == ["cpu:0", "cpu:1", "cpu:2", "cpu:0", "cpu:1", "cpu:2", "cpu:0"]
        status = pool.devices_status()
        assert [s["executions"] for s in status] == [3, 2, 2]
        assert [s["inferences"] for s in status] == [6, 4, 4]
        assert all(s["healthy"] and not s["busy"] and s["failures"] == 0 for s in status)
        assert pool.max_batch_size == 8
        assert [s.name for s in pool.inputs] == ["x"]
    # load and every call of a device ran on that device's single thread
    for name, runner in runners.items():
        assert runner.threads == {f"trtpipe-{name}_0"}


def test_async_run_uses_the_same_order() -> None:
    pool, calls, _ = make_pool(2)

    async def main() -> list[np.ndarray]:
        return [(await pool.run(feeds(v)))["y"] for v in range(4)]

    with pool:
        outs = asyncio.run(main())
    assert calls == ["cpu:0", "cpu:1", "cpu:0", "cpu:1"]
    assert [int(o[0, 0]) for o in outs] == [0, 2, 4, 6]


def test_least_busy_avoids_a_busy_device_where_round_robin_waits_for_it() -> None:
    async def scenario(policy: str) -> list[str]:
        gate = threading.Event()
        pool, calls, _ = make_pool(3, policy=policy, gates={0: gate})
        pool.start()
        try:
            slow = asyncio.ensure_future(pool.run(feeds(1)))  # cpu:0, held busy
            await asyncio.sleep(0.05)
            await pool.run(feeds(2))  # cpu:1
            await pool.run(feeds(3))  # cpu:2
            fourth = asyncio.ensure_future(pool.run(feeds(4)))
            await asyncio.sleep(0.05)
            gate.set()
            await asyncio.gather(slow, fourth)
            return calls
        finally:
            gate.set()
            pool.close()

    # least busy: cpu:0 still runs the first batch, so the fourth goes to idle cpu:1
    assert asyncio.run(scenario("least_busy")) == ["cpu:0", "cpu:1", "cpu:2", "cpu:1"]
    # round robin: the fourth batch is cpu:0's turn and queues behind the first one
    assert asyncio.run(scenario("round_robin")) == ["cpu:0", "cpu:1", "cpu:2", "cpu:0"]


def test_failed_device_is_marked_unhealthy_and_the_batch_retried_elsewhere() -> None:
    pool, calls, _ = make_pool(3, fail_infer=(1,))
    with pool:
        outs = [pool.run_sync(feeds(v))["y"][0, 0] for v in range(5)]
        assert outs == [0, 2, 4, 6, 8]  # nothing failed for the caller
        # cpu:1 failed once, its batch went to cpu:2; afterwards cpu:1 is skipped
        assert calls == ["cpu:0", "cpu:1", "cpu:2", "cpu:0", "cpu:2", "cpu:0"]
        status = {s["device"]: s for s in pool.devices_status()}
        assert status["cpu:1"]["healthy"] is False
        assert status["cpu:1"]["failures"] == 1
        assert "kernel crashed on cpu:1" in status["cpu:1"]["last_error"]
        assert status["cpu:1"]["executions"] == 0
        assert pool.ready and pool.healthy_count == 2


def test_without_retry_the_caller_gets_an_error_naming_the_device() -> None:
    pool, _, _ = make_pool(2, retry=False, fail_infer=(0,))
    with pool:
        with pytest.raises(RunnerError, match=r"cpu:0 failed: kernel crashed on cpu:0"):
            pool.run_sync(feeds())
        np.testing.assert_array_equal(pool.run_sync(feeds(3))["y"], np.full((2, 4), 6))
        assert pool.ready


def test_all_devices_failing_makes_the_pool_not_ready() -> None:
    pool, calls, _ = make_pool(2, fail_infer=(0, 1))
    with pool:
        assert pool.ready
        with pytest.raises(RunnerError, match="cpu:1 failed"):
            pool.run_sync(feeds())  # cpu:0 fails, retried once on cpu:1, which fails too
        assert calls == ["cpu:0", "cpu:1"]
        assert not pool.ready
        with pytest.raises(RunnerError, match="no healthy device left"):
            asyncio.run(pool.run(feeds()))


def test_input_error_is_the_callers_fault_and_keeps_the_device_healthy() -> None:
    pool, calls, _ = make_pool(2)
    with pool:
        with pytest.raises(InputError, match="outside the engine's profile"):
            pool.run_sync({"x": np.zeros((9, 4), dtype=np.int64)})  # 9 rows > max batch 8
        with pytest.raises(InputError, match="unknown input"):
            pool.run_sync({"z": np.zeros((1, 4), dtype=np.int64)})
        assert all(s["healthy"] and s["failures"] == 0 for s in pool.devices_status())
        assert calls == []


def test_load_failure_leaves_other_devices_serving_and_revive_reloads() -> None:
    pool, calls, _ = make_pool(3, fail_load=(1,))
    with pool:
        status = {s["device"]: s for s in pool.devices_status()}
        assert status["cpu:1"]["healthy"] is False
        assert "cannot load on cpu:1" in status["cpu:1"]["last_error"]
        for v in range(4):
            pool.run_sync(feeds(v))
        assert calls == ["cpu:0", "cpu:2", "cpu:0", "cpu:2"]
        assert pool.revive() == []  # still failing
        pool.runner_factory = lambda d: FakeRunner(d, calls)  # the fault is gone
        assert pool.revive() == ["cpu:1"]
        for v in range(3):
            pool.run_sync(feeds(v))
        assert calls[-3:] == ["cpu:0", "cpu:1", "cpu:2"]


def test_start_raises_when_no_device_loads_and_close_is_idempotent() -> None:
    pool, _, _ = make_pool(2, fail_load=(0, 1))
    with pytest.raises(RunnerError, match=r"no device could load.*cpu:0: cannot load on cpu:0"):
        pool.start()
    assert not pool.ready
    pool.close()
    pool.close()
    with pytest.raises(RunnerError, match="not running"):
        pool.run_sync(feeds())


def test_bad_pool_options_are_input_errors() -> None:
    with pytest.raises(InputError, match="unknown policy 'fastest'"):
        make_pool(2, policy="fastest")
    with pytest.raises(InputError, match="at least one device"):
        DevicePool(lambda d: FakeRunner(d, []), [])
    with pytest.raises(InputError, match="twice"):
        DevicePool(lambda d: FakeRunner(d, []), [Device("cpu", 0), Device("cpu", 0)])
