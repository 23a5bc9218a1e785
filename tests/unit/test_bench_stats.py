"""Benchmark arithmetic: percentiles, throughput, batching plans, scaling and server deltas."""

from __future__ import annotations

import numpy as np
import pytest

from trtpipe.bench.common import check_shapes, parse_int_list
from trtpipe.bench.offline import ShapeResult, SideResult
from trtpipe.bench.online import stats_delta
from trtpipe.bench.scaling import ScalingResult, ScalingRow, scaling_configs
from trtpipe.bench.stats import LatencyStats, median, percentile, ratio
from trtpipe.bench.text import pad_batch, plan_batches
from trtpipe.devices import Device
from trtpipe.engine import Manifest, ShapeRange, TensorSpec
from trtpipe.errors import InputError


def test_percentiles_interpolate_linearly() -> None:
    data = list(range(1, 11))
    assert median(data) == pytest.approx(5.5)
    assert percentile(data, 90) == pytest.approx(9.1)
    assert percentile(data, 99) == pytest.approx(9.91)
    assert percentile(data, 0) == 1 and percentile(data, 100) == 10
    assert median([3.0, 1.0, 2.0]) == 2.0


def test_percentile_of_nothing_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="--runs"):
        percentile([], 50)


def test_latency_stats_in_milliseconds() -> None:
    stats = LatencyStats.from_seconds([0.004, 0.001, 0.003, 0.002])
    assert stats.n == 4
    assert stats.median_ms == pytest.approx(2.5)
    assert stats.p50_ms == stats.median_ms
    assert stats.mean_ms == pytest.approx(2.5)
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 4.0))
    assert stats.p90_ms == pytest.approx(3.7)


def test_throughput_and_speedup_from_median_call() -> None:
    engine = SideResult.from_samples([0.25, 0.5, 0.25], batch=32, seq=128)
    torch = SideResult.from_samples([1.0, 1.0, 0.5], batch=32, seq=128)
    assert engine.sequences_per_s == pytest.approx(128.0)
    assert engine.tokens_per_s == pytest.approx(128.0 * 128)
    assert torch.sequences_per_s == pytest.approx(32.0)
    result = ShapeResult(32, 128, engine, torch)
    assert result.speedup == pytest.approx(4.0)
    assert result.to_dict()["speedup"] == pytest.approx(4.0)
    assert ShapeResult(32, 128, engine, None).speedup is None
    assert ratio(1.0, 0.0) is None


@pytest.mark.parametrize("text", ["1,x", "0", "", "-4", "1.5", ", ,"])
def test_bad_int_lists_are_refused(text: str) -> None:
    with pytest.raises(InputError, match="--batch-sizes"):
        parse_int_list(text, "--batch-sizes")


def test_int_lists_are_sorted_and_unique() -> None:
    assert parse_int_list("32, 1,8,8", "--batch-sizes") == [1, 8, 32]


def test_plan_batches_covers_every_text_once_sorted() -> None:
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 40, size=300), [120, 200, 355]])
    batches = plan_batches(lengths, max_batch=32)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(len(b) <= 32 for b in batches)
    assert [int(lengths[i]) for i in flat] == sorted(lengths.tolist())
    # The sparse long tail is not padded into one batch with short texts.
    last = batches[-1]
    assert lengths[last].min() > 100
    launched = sum(len(b) * int(lengths[b].max()) for b in batches)
    assert 1 - lengths.sum() / launched < 0.1


def test_pad_batch_pads_to_the_longest_row_on_either_side() -> None:
    ids = [[101, 7, 102], [101, 102], [101, 5, 6, 7, 102]]
    inputs = [
        TensorSpec("input_ids", "int64", [-1, -1], ["batch", "sequence"]),
        TensorSpec("attention_mask", "int32", [-1, -1], ["batch", "sequence"]),
    ]
    feeds = pad_batch(ids, np.array([1, 0]), inputs, pad_id=0)
    assert feeds["input_ids"].tolist() == [[101, 102, 0], [101, 7, 102]]
    assert feeds["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert feeds["attention_mask"].dtype == np.int32
    left = pad_batch(ids, np.array([1, 2]), inputs, pad_id=0, left=True)
    assert left["input_ids"][0].tolist() == [0, 0, 0, 101, 102]
    assert left["attention_mask"][0].tolist() == [0, 0, 0, 1, 1]


def test_scaling_configs() -> None:
    cpu = [[Device("cpu", 0)], [Device("cpu", 0), Device("cpu", 1)]]
    assert scaling_configs("cpu:2") == cpu
    assert [len(c) for c in scaling_configs("cpu:1,cpu:4")] == [1, 4]
    gpus = scaling_configs(gpus="0,1,2")
    assert [[d.index for d in c] for c in gpus] == [[0], [0, 1], [0, 1, 2]]
    assert all(d.is_gpu for c in gpus for d in c)
    with pytest.raises(InputError):
        scaling_configs("cpu:2", "0")
    with pytest.raises(InputError):
        scaling_configs("cpu:0")


def test_scaling_table_speedup_and_efficiency() -> None:
    rows = [
        ScalingRow(["cpu:0"], 2, [2.0, 2.0], 100),
        ScalingRow(["cpu:0", "cpu:1"], 1, [1.25, 1.25, 1.0], 100),
    ]
    table = ScalingResult(8, 128, 4, rows).to_dict()["rows"]
    assert [r["count"] for r in table] == [1, 2]
    assert table[0]["sequences_per_s"] == pytest.approx(50.0)
    assert table[0]["speedup"] == pytest.approx(1.0)
    assert table[1]["speedup"] == pytest.approx(1.6)
    assert table[1]["efficiency"] == pytest.approx(0.8)


def test_server_statistics_delta() -> None:
    def doc(success: int, queue_ns: int, infer_ns: int, executions: int) -> dict:
        return {
            "inference_count": success,
            "execution_count": executions,
            "inference_stats": {
                "success": {"count": success, "ns": 0},
                "queue": {"count": success, "ns": queue_ns},
                "compute_input": {"count": success, "ns": 0},
                "compute_infer": {"count": success, "ns": infer_ns},
                "compute_output": {"count": success, "ns": 0},
            },
        }

    delta = stats_delta(doc(10, 5_000_000, 20_000_000, 5), doc(110, 105_000_000, 420_000_000, 30))
    assert delta["requests"] == 100
    assert delta["queue_ms"] == pytest.approx(1.0)
    assert delta["compute_infer_ms"] == pytest.approx(4.0)
    assert delta["compute_ms"] == pytest.approx(4.0)
    assert delta["average_batch_size"] == pytest.approx(4.0)
    assert delta["inferences"] == 100 and delta["executions"] == 25


def _manifest(max_batch: int, max_seq: int) -> Manifest:
    spec = TensorSpec("input_ids", "int64", [-1, -1], ["batch", "sequence"])
    return Manifest(
        task="feature-extraction",
        backend="onnxruntime",
        precision="fp32",
        engine_file="model.ort.onnx",
        inputs=[spec],
        outputs=[],
        profile={"input_ids": ShapeRange([1, 1], [4, 16], [max_batch, max_seq])},
    )


def test_shapes_outside_the_profile_are_refused() -> None:
    manifest = _manifest(8, 64)
    check_shapes(manifest, [1, 8], [16, 64])
    with pytest.raises(InputError, match="maximum batch 8"):
        check_shapes(manifest, [1, 32], [16])
    with pytest.raises(InputError, match=r"profile \(1\.\.64\)"):
        check_shapes(manifest, [1], [128])


def test_text_table_flags_a_busy_machine() -> None:
    from trtpipe.bench.report import text_table

    def side(runs: list[float]) -> dict:
        return {
            "sentences_per_s": 100 / sorted(runs)[len(runs) // 2],
            "seconds_median": sorted(runs)[len(runs) // 2],
            "seconds_runs": runs,
            "batches": 7,
            "padding_ratio": 0.5,
            "recipe": "r",
        }

    result = {"texts": 100, "speedup": 2.0, "engine": side([1.0, 1.1, 1.0]),
              "baseline": side([2.0, 5.0, 2.1])}  # fmt: skip
    text = text_table(result)
    assert "speedup 2.00x" in text
    assert "warning: torch passes took 2.0-5.0 s (2.5x apart)" in text
    assert "warning: trtpipe" not in text
