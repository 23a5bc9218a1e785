"""Tiny random Llama / GPT-2 on CPU: engine (ONNX Runtime, KV cache) vs HF generate, one run.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_generation_tiny.py [--runs 5]
Prints a markdown table of medians (tokens/s, time to first token) measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.decoders import save_tiny_gpt2, save_tiny_llama
from trtpipe.build import BuildConfig, build_engine_dir
from trtpipe.export import export_model
from trtpipe.generation.bench import benchmark_generation, hf_generate_baseline
from trtpipe.text import sample_texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    texts = sample_texts()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, save in (("llama", save_tiny_llama), ("gpt2", save_tiny_gpt2)):
            model = save(Path(work) / name)
            onnx = export_model(
                str(model), Path(work) / f"{name}-onnx", "text-generation-with-past"
            )
            engine = Path(work) / f"{name}-engine"
            build_engine_dir(BuildConfig(onnx_path=onnx, output=engine, backend="onnxruntime"))
            for batch, count in ((1, 4), (8, 16)):
                prompts = [t[:40] for t in texts[:count]]
                ours = benchmark_generation(engine, prompts, batch, args.new_tokens, runs=args.runs)
                hf = hf_generate_baseline(model, prompts, batch, args.new_tokens, runs=args.runs)
                rows.append((name, batch, ours, hf))
    print("| model | batch | engine tok/s | HF tok/s | speedup | engine TTFT ms | HF TTFT ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, batch, ours, hf in rows:
        print(
            f"| {name} | {batch} | {ours['tokens_per_s']:.0f} | {hf['tokens_per_s']:.0f} | "
            f"{ours['tokens_per_s'] / hf['tokens_per_s']:.1f}x | {ours['ttft_ms_p50']:.2f} | "
            f"{hf['ttft_ms_p50']:.2f} |"
        )


if __name__ == "__main__":
    main()
