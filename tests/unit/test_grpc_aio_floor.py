"""scripts/grpc_aio_floor.py --round-trips: the bare gRPC round trip at concurrency 1 (grpc.aio's
server or trtpipe's app on uvicorn), timed with tritonclient's asyncio client from a process of
its own."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.scripts import run_script


def floor(*args: object) -> subprocess.CompletedProcess[str]:
    return run_script("grpc_aio_floor.py", *args)


def test_round_trips_print_a_p50_per_round_and_their_median(tiny_bert_engine: Path) -> None:
    done = floor(tiny_bert_engine, "--round-trips", 20, "--rounds", 3, "--thread-hop")
    assert done.returncode == 0, done.stderr
    line = re.search(
        r"^grpc\.aio \+ thread hop c1 p50 per round: (\d+) / (\d+) / (\d+) us \(median (\d+)\)$",
        done.stdout,
        re.MULTILINE,
    )
    assert line is not None, done.stdout
    rounds = sorted(int(v) for v in line.groups()[:3])
    assert rounds[0] > 0
    assert int(line.group(4)) == rounds[1]


def test_the_uvicorn_server_answers_the_same_client(tiny_bert_engine: Path) -> None:
    pytest.importorskip("zttp", reason="uvicorn's HTTP/2 parser (Python 3.11+)")
    done = floor(tiny_bert_engine, "--server", "uvicorn", "--round-trips", 20, "--rounds", 1)
    assert done.returncode == 0, done.stderr
    line = re.search(
        r"^uvicorn HTTP/2 c1 p50 per round: (\d+) us \(median (\d+)\)$", done.stdout, re.M
    )
    assert line is not None, done.stdout
    assert int(line.group(1)) == int(line.group(2)) > 0


def test_round_trips_refuse_zero_rounds(tiny_bert_engine: Path) -> None:
    done = floor(tiny_bert_engine, "--round-trips", 20, "--rounds", 0)
    assert done.returncode == 2
    assert "--rounds at least 1" in done.stderr and "Traceback" not in done.stderr


def test_a_directory_without_an_engine_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    done = floor(tmp_path, "--round-trips", 20)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "no manifest.json" in done.stderr
    assert "Traceback" not in done.stderr
