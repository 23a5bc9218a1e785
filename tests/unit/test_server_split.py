"""What the served-text bench reads off two statistics documents of the server."""

from __future__ import annotations

import pytest

from trtpipe.bench.served_text import cpu_split, server_split


def stats(compute_ns: list[int], executions: int, inferences: int, real: int, padding: int):
    return {
        "execution_count": executions,
        "inference_count": inferences,
        "tokens": {"real": real, "padding": padding},
        "devices": [{"name": f"cpu:{i}", "compute_ns": ns} for i, ns in enumerate(compute_ns)],
    }


def test_engine_busy_is_the_mean_over_workers():
    before = stats([1_000_000_000, 2_000_000_000], 10, 40, 1000, 100)
    # 2 s of wall time: worker 0 ran 1.8 s, worker 1 ran 1.0 s -> (0.9 + 0.5) / 2.
    after = stats([2_800_000_000, 3_000_000_000], 30, 120, 4000, 400)
    split = server_split(before, after, elapsed=2.0)
    assert split["workers"] == 2
    assert split["engine_busy_share"] == pytest.approx(0.7)
    assert split["launches"] == 20
    assert split["average_batch_size"] == pytest.approx(4.0)
    assert split["padding_share"] == pytest.approx(300 / 3300)


def test_one_worker_and_missing_documents():
    before, after = stats([0], 0, 0, 0, 0), stats([500_000_000], 5, 5, 50, 0)
    assert server_split(before, after, elapsed=1.0)["engine_busy_share"] == pytest.approx(0.5)
    assert server_split({}, after, elapsed=1.0) == {}


def test_cpu_per_request_from_two_metrics_reads():
    before = {"process": 10.0, "loop": 2.0}
    after = {"process": 12.5, "loop": 2.4}  # 2.5 s of the process, 0.4 s of the loop
    split = cpu_split(before, after, requests=1000)
    assert split["server_cpu_us_per_request"] == pytest.approx(2500.0)
    assert split["loop_cpu_us_per_request"] == pytest.approx(400.0)


def test_cpu_split_leaves_out_what_the_server_does_not_export():
    assert cpu_split({"process": 1.0}, {"process": 2.0}, 100) == {
        "server_cpu_us_per_request": pytest.approx(10_000.0)
    }
    assert cpu_split({}, {}, 100) == {}
    assert cpu_split({"loop": 1.0}, {"loop": 2.0}, 0) == {}  # no request answered
