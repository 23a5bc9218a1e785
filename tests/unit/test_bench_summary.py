"""scripts/bench_summary.py: the tables from a directory of benchmark JSON, or one clear error."""

from __future__ import annotations

from pathlib import Path

from tests.scripts import run_script

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "perf_cpu"


def test_the_shipped_results_give_one_row_per_engine_and_the_best_engine() -> None:
    done = run_script("bench_summary.py", RESULTS, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| onnxruntime ")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "onnxruntime fp32",
        "onnxruntime fp16",
        "onnxruntime int8",
    ]
    best = run_script("bench_summary.py", RESULTS, "--best-engine", timeout=120)
    assert best.returncode == 0 and best.stdout.strip() == "int8"


def test_a_directory_without_results_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    for target, reason in ((tmp_path, "no fixed_*.json"), (tmp_path / "missing", "not a dir")):
        done = run_script("bench_summary.py", target, timeout=120)
        assert done.returncode == 2
        assert done.stderr.startswith("error: ") and reason in done.stderr
        assert "Traceback" not in done.stderr
