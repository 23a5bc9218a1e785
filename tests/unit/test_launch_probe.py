"""scripts/launch_probe.py times a CPU engine's launches and names a one-token launch's costs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.scripts import run_script


def probe(*args: object) -> subprocess.CompletedProcess[str]:
    return run_script("launch_probe.py", *args)


def test_probe_prints_a_rate_per_batch_and_layout(tiny_bert_engine: Path) -> None:
    done = probe(tiny_bert_engine, "--batches", "1,4", "--rounds", 1, "--length", 8)
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", done.stdout, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [1, 4]
    assert all(int(rate) > 0 for row in rows for rate in row[1:])
    launch = re.search(r"one token, batch 1, one thread: (\d+) us a launch", done.stdout)
    assert launch is not None and int(launch.group(1)) > 0
    assert re.search(r"^  \w+: \d+ us \(\d+ nodes\)$", done.stdout, re.MULTILINE)


def test_probe_refuses_a_directory_without_an_engine(tmp_path: Path) -> None:
    done = probe(tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_probe_refuses_bad_sizes_and_a_length_past_the_model(tiny_bert_engine: Path) -> None:
    bad = probe(tiny_bert_engine, "--batches", "1,x")
    assert bad.returncode == 2 and "bad --batches '1,x'" in bad.stderr
    too_long = probe(tiny_bert_engine, "--batches", 1, "--rounds", 1, "--length", 100000)
    assert too_long.returncode == 2, too_long.stdout
    assert too_long.stderr.startswith(
        "error: input 'input_ids' shape [1, 100000] is outside the engine's profile"
    )
    assert "Traceback" not in too_long.stderr
