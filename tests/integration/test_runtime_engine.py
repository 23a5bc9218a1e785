"""Pool + batcher on a real engine (tiny BERT, ONNX Runtime fp32, two CPU workers).

Each batched response must equal the same request run alone on a plain runner: this is what
proves padding, grouping and row splitting are right on a real attention-masked model.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trtpipe.devices import Device, parse_devices
from trtpipe.engine import EngineDir
from trtpipe.runners.onnxruntime import OnnxRuntimeRunner
from trtpipe.runtime import BatcherConfig, DevicePool, DynamicBatcher

ATOL = 1e-5


@pytest.fixture(scope="module")
def alone(tiny_bert_engine: Path) -> Any:
    """The reference: a plain runner, one request per call, no batching or padding."""
    runner = OnnxRuntimeRunner(EngineDir(tiny_bert_engine), Device("cpu", 0), threads=1)
    runner.load()
    yield runner
    runner.close()


def make_request(engine: EngineDir, rng: np.random.Generator, rows: int, length: int) -> dict:
    ids = rng.integers(1000, 2000, size=(rows, length), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if any(spec.name == "token_type_ids" for spec in engine.manifest.inputs):
        feeds["token_type_ids"] = np.zeros_like(ids)
    return feeds


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        np.testing.assert_allclose(got[name], expected, atol=ATOL, rtol=0, err_msg=name)


def serve(pool: DevicePool, config: BatcherConfig, reqs: list[dict]) -> tuple[list, Any]:
    async def main() -> tuple[list, Any]:
        batcher = DynamicBatcher(pool, config)
        await batcher.start()
        try:
            outs = await asyncio.gather(*(batcher.submit(r) for r in reqs))
        finally:
            await batcher.stop()
        return list(outs), batcher

    return asyncio.run(main())


def test_64_concurrent_mixed_requests_each_match_the_request_run_alone(
    tiny_bert_engine: Path, alone: OnnxRuntimeRunner
) -> None:
    engine = EngineDir(tiny_bert_engine)
    rng = np.random.default_rng(7)
    reqs = [
        make_request(engine, rng, int(rng.integers(1, 3)), int(rng.integers(3, 65)))
        for _ in range(64)
    ]
    with DevicePool.for_engine(engine, parse_devices("cpu:2")) as pool:
        outs, batcher = serve(pool, BatcherConfig(max_queue_delay_ms=5), reqs)
        status = pool.devices_status()
    stats = batcher.stats
    for feeds, out in zip(reqs, outs, strict=True):
        assert_same(out, alone.infer(feeds))
    rows = sum(r["input_ids"].shape[0] for r in reqs)
    assert stats.request_success == 64 and stats.request_failure == 0
    assert stats.inference_count == rows
    assert stats.average_batch_size > 1
    assert max(stats.batch_sizes) <= 8
    assert [s["device"] for s in status] == ["cpu:0", "cpu:1"]
    assert all(s["healthy"] and s["executions"] > 0 for s in status)
    assert sum(s["inferences"] for s in status) == rows
    # every launch was timed on its device and taught the launch cost model
    assert batcher.launch_costs.launches == stats.execution_count
    assert sum(s["compute_ns"] for s in status) > 0


def test_short_request_padded_into_a_long_batch_gives_its_alone_outputs(
    tiny_bert_engine: Path, alone: OnnxRuntimeRunner
) -> None:
    engine = EngineDir(tiny_bert_engine)
    rng = np.random.default_rng(3)
    reqs = [make_request(engine, rng, 1, 5), make_request(engine, rng, 2, 61)]
    config = BatcherConfig(max_queue_delay_ms=100, adaptive_delay=False, group_by_length=False)
    with DevicePool.for_engine(engine, [Device("cpu", 0)]) as pool:
        outs, batcher = serve(pool, config, reqs)
        stats = batcher.stats
    assert stats.execution_count == 1  # really shared one launch, padded 5 -> 64
    assert stats.padded_tokens == 64 - 5 + 2 * (64 - 61)
    for feeds, out in zip(reqs, outs, strict=True):
        assert_same(out, alone.infer(feeds))
    assert outs[0]["last_hidden_state"].shape == (1, 5, 32)


def test_left_padding_shifts_bert_positions_so_right_is_the_default(
    tiny_bert_engine: Path, alone: OnnxRuntimeRunner
) -> None:
    """BERT's absolute positions count from the left: left padding changes its outputs."""
    engine = EngineDir(tiny_bert_engine)
    rng = np.random.default_rng(3)
    reqs = [make_request(engine, rng, 1, 5), make_request(engine, rng, 1, 61)]
    config = BatcherConfig(
        max_queue_delay_ms=100, adaptive_delay=False, group_by_length=False, padding_side="left"
    )
    assert BatcherConfig().padding_side == "right"
    with DevicePool.for_engine(engine, [Device("cpu", 0)]) as pool:
        outs, _ = serve(pool, config, reqs)
    short = outs[0]["last_hidden_state"]
    assert short.shape == (1, 5, 32)  # still cut to its own tokens, from the right end
    assert np.abs(short - alone.infer(reqs[0])["last_hidden_state"]).max() > 0.1


def test_cpu_workers_share_the_cores(tiny_bert_engine: Path) -> None:
    from trtpipe.runtime.pool import cpu_cores

    pool = DevicePool.for_engine(tiny_bert_engine, parse_devices("cpu:2"))
    with pool:
        threads = [w.runner.threads for w in pool._workers if w.runner is not None]
        assert pool.max_batch_size == 8
        assert pool.profile["input_ids"].max == [8, 64]
    assert threads == [max(1, cpu_cores() // 2)] * 2
    with DevicePool.for_engine(tiny_bert_engine, [Device("cpu", 0)], threads_per_cpu_worker=1) as p:
        assert [w.runner.threads for w in p._workers if w.runner is not None] == [1]


def test_cpu_workers_run_one_shared_session(
    tiny_bert_engine: Path, alone: OnnxRuntimeRunner
) -> None:
    """CPU workers of one pool hold one narrow session (weights once) and one wide session for a
    launch that runs alone; the last worker to close drops them; sharing can be turned off."""
    from trtpipe.runtime.pool import cpu_cores

    engine = EngineDir(tiny_bert_engine)
    feeds = make_request(engine, np.random.default_rng(5), 2, 12)
    pool = DevicePool.for_engine(engine, parse_devices("cpu:3"), threads_per_cpu_worker=1)
    with pool:
        runners: list[Any] = [w.runner for w in pool._workers]
        shared = runners[0].shared
        assert shared is not None and shared.users == 3
        assert {id(r.session) for r in runners} == {id(shared.sessions[0])}
        wide = cpu_cores() > 1  # a one-core machine has nothing wider than one thread
        assert len(shared.sessions) == (2 if wide else 1)
        status = pool.devices_status()
        assert [s["threads"] for s in status] == [1, 1, 1]
        assert [s["alone_threads"] for s in status] == [cpu_cores() if wide else 1] * 3
        runners[0].close()
        assert shared.users == 2
        for runner in runners[1:]:
            assert_same(runner.infer(feeds), alone.infer(feeds))  # alone: the wide session
        with shared.launch():  # another worker busy: the narrow session runs this one
            assert_same(runners[1].infer(feeds), alone.infer(feeds))
    assert shared.users == 0 and shared.sessions == []
    apart = DevicePool.for_engine(engine, parse_devices("cpu:2"), share_cpu_session=False)
    with apart:
        workers: list[Any] = [w.runner for w in apart._workers]
        assert workers[0].shared is None and workers[0].session is not workers[1].session


def test_warm_up_runs_every_shared_session(tiny_bert_engine: Path) -> None:
    from trtpipe.runtime.pool import cpu_cores
    from trtpipe.runtime.warmup import warm_up, warmup_shapes

    engine = EngineDir(tiny_bert_engine)
    pool = DevicePool.for_engine(engine, parse_devices("cpu:2"), threads_per_cpu_worker=1)
    with pool:
        runner: Any = pool._workers[0].runner
        calls: list[int] = []

        class Counting:
            def __init__(self, session: Any, index: int):
                self.session, self.index = session, index

            def run(self, names: Any, feeds: Any) -> Any:
                calls.append(self.index)
                return self.session.run(names, feeds)

        shared = runner.shared
        shared._narrow = Counting(shared._narrow, 0)
        if shared._wide is not None:
            shared._wide = Counting(shared._wide, 1)
        shapes = warmup_shapes(engine.manifest, 8)
        warm_up(runner, engine.manifest, shapes)
    assert calls.count(0) == len(shapes)
    assert calls.count(1) == (len(shapes) if cpu_cores() > 1 else 0)
