"""What the served-text bench reads off two statistics documents of the server."""

from __future__ import annotations

import numpy as np
import pytest

from trtpipe.bench.served_offline import Offline
from trtpipe.bench.served_text import _judged, served_text_table
from trtpipe.bench.server_readings import cpu_split, server_split


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
    # 2.8 s inside the engines for 80 answered requests; no queue statistics in these documents.
    assert split["engine_ms_per_request"] == pytest.approx(35.0)
    assert split["queue_ms"] is None


def test_queue_wait_and_engine_time_per_request():
    before = stats([0, 0], 0, 0, 0, 0)
    after = stats([300_000_000, 200_000_000], 20, 50, 1000, 0)
    after["inference_stats"] = {
        "success": {"count": 50, "ns": 0},
        "queue": {"count": 50, "ns": 600_000_000},
    }
    split = server_split(before, after, elapsed=1.0)
    assert split["queue_ms"] == pytest.approx(12.0)  # 0.6 s of waiting over 50 requests
    assert split["engine_ms_per_request"] == pytest.approx(10.0)  # 0.5 s of engine / 50


def test_offline_time_per_sentence_counts_its_threads():
    offline = Offline(
        vectors=np.zeros((1, 2), np.float32),
        direct_p50_ms=1.0,
        sorted_per_s=500.0,
        arrival_per_s={},
        ids=[[1]],
        precision="int8",
        inputs=["input_ids"],
        threads=2,
    )
    assert offline.sorted_ms_per_sentence == pytest.approx(4.0)  # 2 threads x 1/500 s
    offline.threads = 0  # a GPU ran the offline passes: no thread time to compare
    assert offline.sorted_ms_per_sentence is None
    text = served_text_table(
        {
            "model": "m",
            "texts": 1,
            "mean_tokens": 1.0,
            "protocols": [],
            "offline": {
                "precision": "int8",
                "sorted_sentences_per_s": 500.0,
                "direct_batch1_p50_ms": 1.0,
                "threads": 2,
                "sorted_ms_per_sentence": 4.0,
            },
        }
    )
    assert "sorted 4.00 ms per sentence on 2 thread(s)" in text
    gpu = {"sorted_sentences_per_s": 500.0, "direct_batch1_p50_ms": 1.0, "precision": "fp16"}
    text = served_text_table(
        {"model": "m", "texts": 1, "mean_tokens": 1.0, "protocols": [], "offline": gpu}
    )
    assert "ms per sentence" not in text


def test_a_protocol_is_judged_against_the_offline_figures_around_it():
    """The machine slowed from 300 to 200 sentences/s while the protocol ran: its levels are
    shares of 250/s, not of the 300/s measured at the start."""
    levels = [
        {"concurrency": 16, "requests_per_s": 200.0, "of_offline_sorted_at_start": 200 / 300},
        {"concurrency": 64, "requests_per_s": 225.0, "of_offline_sorted_at_start": 225 / 300},
    ]
    result = _judged({"protocol": "openai", "levels": levels}, before=300.0, after=200.0)
    assert result["offline_sorted_before_after"] == [300.0, 200.0]
    assert [lv["of_offline_sorted"] for lv in levels] == pytest.approx([0.8, 0.9])
    assert levels[0]["of_offline_sorted_at_start"] == pytest.approx(2 / 3)  # kept beside it
    for level in levels:
        level.update(latency_ms={"p50_ms": 1.0, "p99_ms": 2.0}, wrong_replies=0, errors=0)
        level.update(of_offline_arrival=None, client_cpu_share=0.02, server={})
    offline = {
        "precision": "int8",
        "sorted_sentences_per_s": 300.0,
        "sorted_sentences_per_s_checkpoints": [300.0, 200.0],
        "direct_batch1_p50_ms": 1.0,
    }
    text = served_text_table(
        {"model": "m", "texts": 1, "mean_tokens": 1.0, "protocols": [result], "offline": offline}
    )
    assert "sorted 300.0/s at the start, then 200.0 after each protocol" in text
    assert "of the mean of the offline sorted figures measured just before and after" in text
    assert [line.split()[3] for line in text.splitlines() if line.startswith("openai")] == [
        "80%",
        "90%",
    ]


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
