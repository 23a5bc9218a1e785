"""Device pool: dispatch order, least-busy, failure handling and readiness, with fake runners."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from trtpipe.devices import Device
from trtpipe.engine import ShapeRange, TensorSpec
from trtpipe.errors import EngineMismatchError, InputError, RunnerError
from trtpipe.runners.base import Runner
from trtpipe.runtime.pool import Backoff, DevicePool

INPUTS = [TensorSpec("x", "int64", [-1, -1], ["batch", "sequence"])]
OUTPUTS = [TensorSpec("y", "int64", [-1, -1], ["batch", "sequence"])]
PROFILE = {"x": ShapeRange([1, 1], [4, 8], [8, 16])}


class FakeRunner(Runner):
    """Test double: a strict runner that doubles its input and records every call.

    Refuses to run before ``load``; can be told to fail loading or a call, or to block until
    released so a test can hold a device busy (``entered`` is released when a call starts).
    """

    backend = "fake"

    def __init__(
        self,
        device: Device,
        calls: list[str],
        fail_load: bool = False,
        fail_infer: bool = False,
        gate: threading.Event | None = None,
        entered: threading.Semaphore | None = None,
    ):
        super().__init__(device)
        self.calls = calls
        self.fail_load = fail_load
        self.fail_infer = fail_infer
        self.gate = gate
        self.entered = entered
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
        if self.entered is not None:
            self.entered.release()
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
    entered: threading.Semaphore | None = None,
    backoff: Backoff | None = None,
) -> tuple[DevicePool, list[str], dict[str, FakeRunner]]:
    """A pool of FakeRunners on cpu:0..count-1; background reloading off unless ``backoff``."""
    calls: list[str] = []
    runners: dict[str, FakeRunner] = {}

    def factory(device: Device) -> Runner:
        runner = FakeRunner(
            device,
            calls,
            fail_load=device.index in fail_load,
            fail_infer=device.index in fail_infer,
            gate=(gates or {}).get(device.index),
            entered=entered,
        )
        runners[str(device)] = runner
        return runner

    devices = [Device("cpu", i) for i in range(count)]
    pool = DevicePool(factory, devices, policy, retry_on_failure=retry, reload_backoff=backoff)
    return pool, calls, runners


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
        assert runner.threads == {f"trtpipe-{name}"}


def test_async_run_uses_the_same_order() -> None:
    pool, calls, _ = make_pool(2)

    async def main() -> list[np.ndarray]:
        return [(await pool.run(feeds(v)))["y"] for v in range(4)]

    with pool:
        outs = asyncio.run(main())
    assert calls == ["cpu:0", "cpu:1", "cpu:0", "cpu:1"]
    assert [int(o[0, 0]) for o in outs] == [0, 2, 4, 6]


def test_run_timed_reports_the_runners_time_not_the_queueing() -> None:
    gate, entered = threading.Event(), threading.Semaphore(0)
    pool, calls, _ = make_pool(1, "shared_queue", gates={0: gate}, entered=entered)

    async def main() -> tuple[int, int, float]:
        held = asyncio.ensure_future(pool.run_timed(feeds(1)))
        await reached(entered)
        queued = asyncio.ensure_future(pool.run_timed(feeds(2)))  # waits behind the held one
        started = time.perf_counter()
        await asyncio.sleep(0.05)
        gate.set()
        (first, first_ns), (second, second_ns) = await asyncio.gather(held, queued)
        assert int(first["y"][0, 0]) == 2 and int(second["y"][0, 0]) == 4
        return first_ns, second_ns, time.perf_counter() - started

    with pool:
        first_ns, second_ns, waited = asyncio.run(main())
    assert calls == ["cpu:0", "cpu:0"]
    assert first_ns >= 50e6  # held on the device for the 50 ms
    assert waited >= 0.05 and 0 < second_ns < 25e6  # queued 50 ms, ran at once


async def reached(entered: threading.Semaphore, times: int = 1) -> None:
    """Wait until ``times`` more calls have started on some device (no sleeps)."""
    for _ in range(times):
        assert await asyncio.to_thread(entered.acquire, True, 10), "no device started the call"


def test_least_busy_avoids_a_busy_device_where_round_robin_waits_for_it() -> None:
    async def scenario(policy: str) -> list[str]:
        gate, entered = threading.Event(), threading.Semaphore(0)
        pool, calls, _ = make_pool(3, policy=policy, gates={0: gate}, entered=entered)
        pool.start()
        try:
            slow = asyncio.ensure_future(pool.run(feeds(1)))  # cpu:0, held busy
            await reached(entered)
            await pool.run(feeds(2))  # cpu:1
            await pool.run(feeds(3))  # cpu:2
            fourth = asyncio.ensure_future(pool.run(feeds(4)))
            await asyncio.sleep(0)  # one loop turn: the fourth batch is dealt, cpu:0 still held
            assert pool.devices_status()[0]["inflight"] == (2 if policy == "round_robin" else 1)
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


def test_shared_queue_a_free_device_takes_the_next_batch_while_others_are_held() -> None:
    async def scenario(policy: str) -> tuple[str, int]:
        gates = {i: threading.Event() for i in range(3)}
        entered = threading.Semaphore(0)
        pool, calls, _ = make_pool(3, policy=policy, gates=gates, entered=entered)
        pool.start()
        try:
            held = [asyncio.ensure_future(pool.run(feeds(v))) for v in range(3)]
            await reached(entered, 3)  # every device holds one batch, none can take two
            assert sorted(calls) == ["cpu:0", "cpu:1", "cpu:2"]
            fourth = asyncio.ensure_future(pool.run(feeds(7)))
            await asyncio.sleep(0)  # the fourth batch is queued (shared) or dealt (round robin)
            gates[1].set()  # only cpu:1 frees up
            if policy == "shared_queue":
                out = await fourth
                assert calls[3] == "cpu:1"  # the free device took it
                assert sum(t.done() for t in held) == 1  # only cpu:1's own; the others held
            for gate in gates.values():
                gate.set()
            out = await fourth
            await asyncio.gather(*held)
            return calls[3], int(out["y"][0, 0])
        finally:
            for gate in gates.values():
                gate.set()
            pool.close()

    assert asyncio.run(scenario("shared_queue")) == ("cpu:1", 14)
    # round robin dealt the fourth batch to cpu:0, which only ran it once released
    assert asyncio.run(scenario("round_robin")) == ("cpu:0", 14)


def test_a_batch_dealt_to_a_device_whose_batch_is_failing_is_re_dealt_not_failed() -> None:
    """The race behind the flaky server test: round-robin dealt a second batch to cpu:1 while
    cpu:1's first batch was failing; that batch failed too ("cpu:1 is not loaded") and cpu:1's
    failures were counted twice. Now it goes to a healthy device and cpu:1 fails once."""

    async def scenario() -> tuple[list[object], list[str], DevicePool]:
        gate, entered = threading.Event(), threading.Semaphore(0)
        pool, calls, _ = make_pool(
            2, retry=False, fail_infer=(1,), gates={1: gate}, entered=entered
        )
        pool.start()
        try:
            tasks = [asyncio.ensure_future(pool.run(feeds(v))) for v in range(4)]
            await reached(entered, 2)  # cpu:0 ran batch 0; cpu:1 is inside batch 1
            await asyncio.wait_for(asyncio.gather(tasks[0], tasks[2]), 10)  # cpu:0 did 0 and 2
            # batch 3 was dealt to cpu:1 (its turn) and waits behind the batch that will fail
            assert [s["inflight"] for s in pool.devices_status()] == [0, 2]
            gate.set()  # cpu:1's batch 1 now fails
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return results, calls, pool
        finally:
            gate.set()
            pool.close()

    results, calls, pool = asyncio.run(scenario())
    assert not isinstance(results[3], Exception), results[3]  # before: "cpu:1 is not loaded"
    assert isinstance(results[1], RunnerError)
    assert str(results[1]) == "cpu:1 failed: kernel crashed on cpu:1"
    assert [int(r["y"][0, 0]) for i, r in enumerate(results) if i != 1] == [0, 4, 6]  # type: ignore[index]
    assert calls.count("cpu:1") == 1 and calls.count("cpu:0") == 3  # batch 3 re-dealt to cpu:0
    status = {s["device"]: s for s in pool.devices_status()}
    assert status["cpu:1"]["failures"] == 1 and status["cpu:1"]["executions"] == 0
    assert status["cpu:0"]["failures"] == 0 and status["cpu:0"]["executions"] == 3


def test_shared_queue_an_unhealthy_device_stops_taking_batches() -> None:
    async def scenario() -> tuple[list[object], list[str], DevicePool]:
        gates = {0: threading.Event(), 1: threading.Event()}
        entered = threading.Semaphore(0)
        pool, calls, _ = make_pool(
            2, "shared_queue", retry=False, fail_infer=(1,), gates=gates, entered=entered
        )
        pool.start()
        try:
            tasks = [asyncio.ensure_future(pool.run(feeds(v))) for v in range(6)]
            await reached(entered, 2)  # each device holds one batch; four wait in the queue
            gates[1].set()  # cpu:1 fails its batch and takes no other
            await reached(entered, 0)
            failed = next(i for i, c in enumerate(calls) if c == "cpu:1")
            await asyncio.wait_for(asyncio.gather(tasks[failed], return_exceptions=True), 10)
            assert not pool.devices_status()[1]["healthy"]
            gates[0].set()
            return list(await asyncio.gather(*tasks, return_exceptions=True)), calls, pool
        finally:
            for gate in gates.values():
                gate.set()
            pool.close()

    results, calls, pool = asyncio.run(scenario())
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and str(errors[0]) == "cpu:1 failed: kernel crashed on cpu:1"
    for value, result in enumerate(results):
        if not isinstance(result, Exception):
            np.testing.assert_array_equal(result["y"], np.full((2, 4), 2 * value))  # type: ignore[index]
    assert sorted(calls) == ["cpu:0"] * 5 + ["cpu:1"]
    assert [s["failures"] for s in pool.devices_status()] == [0, 1]


def test_shared_queue_retries_a_failed_batch_on_another_device() -> None:
    pool, calls, _ = make_pool(2, "shared_queue", fail_infer=(0, 1))
    with pool:
        with pytest.raises(RunnerError, match=r"no healthy device left|cpu:\d failed"):
            pool.run_sync(feeds())
        assert sorted(calls) == ["cpu:0", "cpu:1"]  # tried once on each, then given up
        assert not pool.ready
    pool, calls, _ = make_pool(2, "shared_queue", fail_infer=(1,))
    with pool:
        outs = [int(pool.run_sync(feeds(v))["y"][0, 0]) for v in range(4)]
        assert outs == [0, 2, 4, 6]  # a batch cpu:1 took (if any) was retried on cpu:0
        assert calls.count("cpu:0") == 4 and calls.count("cpu:1") <= 1


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


# -- healing: unhealthy devices reload in the background ---------------------------------------
FAST = Backoff(initial_s=0.01, max_s=0.04)


class FlakyFactory:
    """Runner factory whose runners on one device fail, by script, then work.

    ``load_errors``: what the next loads on ``device`` raise (then they succeed);
    ``bad_runners``: how many first runners on ``device`` fail their first call.
    ``load_gate`` holds every reload (not the first load) until the test opens it.
    """

    def __init__(
        self,
        device: int,
        load_errors: list[Exception] | None = None,
        bad_runners: int = 0,
        load_gate: threading.Event | None = None,
    ):
        self.device = device
        self.load_errors = list(load_errors or [])
        self.bad_runners = bad_runners
        self.load_gate = load_gate
        self.calls: list[str] = []
        self.loads: dict[int, int] = {}
        self.load_started = threading.Semaphore(0)

    def __call__(self, device: Device) -> Runner:
        count = self.loads[device.index] = self.loads.get(device.index, 0) + 1
        ours = device.index == self.device
        runner = FakeRunner(device, self.calls, fail_infer=ours and count <= self.bad_runners)
        if ours:
            self.load_started.release()
            if self.load_gate is not None and count > 1:
                assert self.load_gate.wait(10), "load gate never opened"
            if self.load_errors:
                raise self.load_errors.pop(0)
        return runner


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll a state the pool reaches on its own thread (the outcome, not the timing, is tested)."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def state(pool: DevicePool, index: int) -> dict[str, Any]:
    return pool.devices_status()[index]


def test_a_device_that_failed_a_batch_is_reloaded_in_the_background_and_serves_again() -> None:
    factory = FlakyFactory(device=1, bad_runners=1)
    with DevicePool(
        factory, [Device("cpu", 0), Device("cpu", 1)], "round_robin", reload_backoff=FAST
    ) as pool:
        outs = [int(pool.run_sync(feeds(v))["y"][0, 0]) for v in range(2)]
        assert outs == [0, 2]  # cpu:1 failed the second batch, retried on cpu:0
        assert pool.wait_healthy(2, timeout=10)
        status = state(pool, 1)
        assert status["state"] == "healthy" and status["reloads"] == 1
        assert status["failures"] == 1 and status["next_reload_s"] is None
        assert factory.loads == {0: 1, 1: 2}
        for v in range(4):
            pool.run_sync(feeds(v))
        assert factory.calls[-4:].count("cpu:1") == 2  # dealt to again, and it works
        assert state(pool, 1)["executions"] == 2


def test_readiness_follows_the_reload() -> None:
    load_gate = threading.Event()
    factory = FlakyFactory(device=0, bad_runners=1, load_gate=load_gate)
    pool = DevicePool(factory, [Device("cpu", 0)], reload_backoff=FAST)
    with pool:
        assert pool.ready
        with pytest.raises(RunnerError, match="cpu:0 failed: kernel crashed on cpu:0"):
            pool.run_sync(feeds())
        assert not pool.ready and pool.healthy_count == 0
        with pytest.raises(RunnerError, match="no healthy device left"):
            pool.run_sync(feeds())
        assert factory.load_started.acquire(timeout=10)  # first load
        assert factory.load_started.acquire(timeout=10)  # the reload, held at the gate
        assert state(pool, 0)["state"] == "reloading" and not pool.ready
        load_gate.set()
        assert pool.wait_healthy(1, timeout=10)
        assert pool.ready and state(pool, 0)["state"] == "healthy"
        np.testing.assert_array_equal(pool.run_sync(feeds(5))["y"], np.full((2, 4), 10))


def test_reloads_back_off_exponentially_until_the_device_loads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors: list[Exception] = [RunnerError(f"CUDA error 999 (try {i})") for i in range(3)]
    factory = FlakyFactory(device=1, load_errors=errors)
    caplog.set_level(logging.WARNING, logger="trtpipe.runtime")
    with DevicePool(factory, [Device("cpu", 0), Device("cpu", 1)], reload_backoff=FAST) as pool:
        assert state(pool, 1)["state"] == "unhealthy"  # the first load failed; the pool serves
        assert pool.wait_healthy(2, timeout=10)
        assert state(pool, 1)["reloads"] == 1 and factory.loads[1] == 4
        assert "CUDA error 999 (try 2)" in state(pool, 1)["last_error"]
    delays = [r.getMessage() for r in caplog.records if "reloading in" in r.getMessage()]
    assert delays == [
        "cpu:1: reloading in 0.01 s (1 failure(s) in a row)",
        "cpu:1: reloading in 0.02 s (2 failure(s) in a row)",
        "cpu:1: reloading in 0.04 s (3 failure(s) in a row)",
    ]


def test_a_configuration_error_at_load_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    wrong = EngineMismatchError("engine built for sm_90, this GPU is sm_80; rebuild it here")
    factory = FlakyFactory(device=1, bad_runners=1, load_errors=[])
    caplog.set_level(logging.ERROR, logger="trtpipe.runtime")
    devices = [Device("cpu", 0), Device("cpu", 1)]
    with DevicePool(factory, devices, "round_robin", reload_backoff=FAST) as pool:
        factory.load_errors.append(wrong)  # the reload after the fault meets the wrong engine
        pool.run_sync(feeds(0))
        pool.run_sync(feeds(1))  # cpu:1 fails, retried on cpu:0
        wait_for(lambda: state(pool, 1)["state"] == "failed", "cpu:1 to give up")
        assert state(pool, 1)["next_reload_s"] is None
        assert "rebuild it here" in state(pool, 1)["last_error"]
        for v in range(3):
            pool.run_sync(feeds(v))  # served by cpu:0; no reload is scheduled any more
        assert factory.loads[1] == 2
        assert pool.revive() == ["cpu:1"]  # an explicit revive still tries (the fix is in)
    assert any("will not be reloaded" in r.getMessage() for r in caplog.records)


def test_close_stops_background_reloads() -> None:
    errors: list[Exception] = [RunnerError("device lost") for _ in range(1000)]
    factory = FlakyFactory(device=1, load_errors=errors)
    pool = DevicePool(
        factory, [Device("cpu", 0), Device("cpu", 1)], reload_backoff=Backoff(0.001, 0.001)
    )
    pool.start()
    for _ in range(3):
        assert factory.load_started.acquire(timeout=10)  # it keeps trying
    pool.close()
    attempts = factory.loads[1]
    assert [s["state"] for s in pool.devices_status()] == ["closed", "closed"]
    assert not pool.ready
    assert not [
        t.name for t in threading.enumerate() if t.name in ("trtpipe-cpu:0", "trtpipe-cpu:1")
    ]
    assert factory.loads[1] == attempts


def test_backoff_delays_and_bad_settings() -> None:
    backoff = Backoff(initial_s=1, max_s=60)
    assert [backoff.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert Backoff(0.5, 0.5, factor=1).delay(100) == 0.5
    with pytest.raises(InputError, match="initial delay 0 s must be > 0"):
        Backoff(initial_s=0)
    with pytest.raises(InputError, match="max delay 1 s is below the initial 2 s"):
        Backoff(initial_s=2, max_s=1)
