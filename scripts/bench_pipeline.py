"""Pipeline stages on CPU workers: GPipe micro-batches vs naive sequential stages, one run.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_pipeline.py [--onnx model.onnx] [--runs 7]

Builds all-MiniLM-L6-v2 fp32 as 2 stages (blocks 0-2 and 3-5: equal compute) on ONNX Runtime,
runs the same batches with 1 micro-batch (the naive schedule: one stage works at a time) and
with 4 and 8, rounds interleaved, after a warm-up. Prints a markdown table of medians:
sentences/s, the ratio to naive in the same run, and each stage's bubble (idle share of the
batch's wall time, from the stage runners' busy time). The unsplit engine on one worker with
all cores is printed as context.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.devices import Device, cpu_cores
from trtpipe.engine import EngineDir
from trtpipe.runners import runner_for
from trtpipe.runners.pipeline import PipelineRunner
from trtpipe.text import encode, load_tokenizer, sample_texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", type=Path, help="An all-MiniLM-L6-v2 export (default: export)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        onnx = args.onnx
        if onnx is None:
            from trtpipe.export import export_model

            onnx = export_model("sentence-transformers/all-MiniLM-L6-v2", Path(work) / "onnx")
        shapes = {"input_ids": [args.batch, args.seq]}
        staged = build_engine_dir(
            BuildConfig(
                onnx_path=onnx,
                output=Path(work) / "pp2",
                backend="onnxruntime",
                max_shapes=shapes,
                opt_shapes=shapes,
                stage_layers="0-2,3-5",
            )
        )
        whole = build_engine_dir(
            BuildConfig(
                onnx_path=onnx,
                output=Path(work) / "whole",
                backend="onnxruntime",
                max_shapes=shapes,
                opt_shapes=shapes,
            )
        )
        run(staged, whole, args)


def run(staged: EngineDir, whole: EngineDir, args: argparse.Namespace) -> None:
    texts = sample_texts()
    batch_texts = [texts[i % len(texts)] for i in range(args.batch)]
    feeds = encode(load_tokenizer(str(staged.path)), batch_texts, staged.manifest.inputs, args.seq)
    schedules = (1, 4, 8)
    times: dict[int, list[float]] = {m: [] for m in schedules}
    bubbles: dict[int, list[list[float]]] = {m: [] for m in schedules}
    whole_times: list[float] = []
    devices = [Device("cpu", 0), Device("cpu", 1)]
    with runner_for(staged, devices) as pipe, runner_for(whole, Device("cpu", 0)) as single:
        assert isinstance(pipe, PipelineRunner)
        for m in schedules:  # warm-up
            pipe.micro_batches = m
            pipe.infer(feeds)
        single.infer(feeds)
        for _ in range(args.runs):
            for m in schedules:
                pipe.micro_batches = m
                start = time.perf_counter()
                pipe.infer(feeds)
                times[m].append(time.perf_counter() - start)
                bubbles[m].append(pipe.last_stats.bubble())
            start = time.perf_counter()
            single.infer(feeds)
            whole_times.append(time.perf_counter() - start)
    naive = statistics.median(times[1])
    print(
        f"all-MiniLM-L6-v2 fp32, batch {args.batch} x {feeds['input_ids'].shape[1]} tokens, "
        f"{args.runs} runs, {cpu_cores()} cores; stages 0-2 | 3-5 on cpu:0, cpu:1 "
        f"({pipe.threads or max(1, cpu_cores() // 2)} threads each)\n"
    )
    print("| schedule | sentences/s | vs naive | bubble stage 0 | bubble stage 1 |")
    print("|---|---|---|---|---|")
    for m in schedules:
        med = statistics.median(times[m])
        b0 = statistics.median(b[0] for b in bubbles[m])
        b1 = statistics.median(b[1] for b in bubbles[m])
        label = "naive sequential (1 micro-batch)" if m == 1 else f"GPipe, {m} micro-batches"
        print(
            f"| {label} | {args.batch / med:.1f} | {naive / med:.2f}x | "
            f"{100 * b0:.0f}% | {100 * b1:.0f}% |"
        )
    med = statistics.median(whole_times)
    print(f"| unsplit engine, 1 worker | {args.batch / med:.1f} | {naive / med:.2f}x | - | - |")


if __name__ == "__main__":
    main()
