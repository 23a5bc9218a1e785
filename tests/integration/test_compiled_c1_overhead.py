"""scripts/compiled_c1_overhead.py: the c1 overhead of a served engine with wrk and h2load as
the clients, against direct batch-1 calls of the same sentences in the script's process."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.scripts import run_script

PAIR_LINE = re.compile(
    r"^(?P<protocol>\S+)\s+c1 overhead (?P<median>-?[\d.]+) ms \(median of (?P<overheads>[^;]+); "
    r"served p50 (?P<served>[^;]+); direct p50 (?P<direct>[^)]+) ms\)$",
    re.M,
)


def test_a_directory_without_an_engine_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run_script("compiled_c1_overhead.py", tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "no manifest.json" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(240)
@pytest.mark.skipif(
    shutil.which("wrk") is None or shutil.which("h2load") is None,
    reason="needs wrk and h2load (apt-get install wrk nghttp2-client)",
)
def test_each_protocol_gets_its_pairs_and_their_median(minilm_serving_engine: Path) -> None:
    """Served against the real engine (MiniLM, small profile): each pair is served p50 minus
    direct p50, and the figure is their median."""
    done = run_script(
        "compiled_c1_overhead.py",
        minilm_serving_engine,
        "--protocols",
        "openai,grpc-tokens",
        "--pairs",
        "3",
        "--seconds",
        "1",
        "--direct-calls",
        "30",
        "--sentences",
        "8",
        "--port",
        "18290",
        timeout=220,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "direct calls on" in done.stdout and "8 sentences" in done.stdout
    rows = {m["protocol"]: m for m in PAIR_LINE.finditer(done.stdout)}
    assert sorted(rows) == ["grpc-tokens", "openai"]
    for row in rows.values():
        overheads = [float(v) for v in row["overheads"].split(", ")]
        served = [float(v) for v in row["served"].split(", ")]
        direct = [float(v) for v in row["direct"].split(", ")]
        assert len(overheads) == len(served) == len(direct) == 3
        assert all(s > 0 and d > 0 for s, d in zip(served, direct, strict=True))
        for overhead, s, d in zip(overheads, served, direct, strict=True):
            assert overhead == pytest.approx(s - d, abs=0.011)  # printed to 0.01 ms
        assert float(row["median"]) == pytest.approx(sorted(overheads)[1], abs=0.011)


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (nghttp2-client)")
def test_failed_calls_end_the_run_with_one_line(tiny_bert_engine: Path) -> None:
    """h2load counts a gRPC error (HTTP 200, status in the trailers) as a success; the script
    reads the server's failure counter instead. The tiny BERT has no sentence_embedding output,
    so every call of the gRPC body fails."""
    done = run_script(
        "compiled_c1_overhead.py",
        tiny_bert_engine,
        "--protocols",
        "grpc-tokens",
        "--pairs",
        "1",
        "--seconds",
        "1",
        "--port",
        "18294",
        timeout=100,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: grpc-tokens: requests failed in a served block (")
    assert "gRPC errors" in done.stderr and "Traceback" not in done.stderr
    assert "c1 overhead" not in done.stdout
