"""A staged decoder on two CPU workers: one sequence group at a time vs two interleaved (not CI).

Usage: HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_pipeline_decoder.py [--runs 5]

Makes a random Llama (hidden 512, 4 layers, the test suite's tokenizer; nothing downloaded),
exports it with the KV cache, builds it fp32 on ONNX Runtime unsplit and as 2 stages, then runs
the same prompts greedy in rounds (interleaved, after a warm-up):

- staged, ``interleave=1``: one session per replica, the stages step one after the other;
- staged, ``interleave=2``: two sessions over the same stages, two prompt chunks at once, so
  stage 0 runs one group's step while stage 1 runs the other's;
- the unsplit engine on one worker with every core, as context.

Prints a markdown table of medians: generated tokens/s, the ratio to ``interleave=1`` in the
same run, and each stage's bubble (1 - busy / wall over the run, from the stages' own timers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtpipe.devices import Device


def make_model(target: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.decoders import save_tokenizer

    target.mkdir(parents=True, exist_ok=True)
    save_tokenizer(target)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(target)
    return target


def build(onnx_path: Path, out: Path, stages: int) -> Path:
    from trtpipe.build import BuildConfig, build_engine_dir

    past = "past_key_values.0.key"
    build_engine_dir(
        BuildConfig(
            onnx_path=onnx_path,
            output=out,
            backend="onnxruntime",
            opt_shapes={"input_ids": [8, 16]},
            max_shapes={"input_ids": [16, 64], past: [16, 8, 128, 64]},
            pipeline_stages=stages,
        )
    )
    return out


def main() -> None:
    from tests.decoders import CORPUS
    from trtpipe.generation import Generator, SamplingParams

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    prompts = [CORPUS[i % len(CORPUS)] for i in range(args.prompts)]
    params = SamplingParams(args.new_tokens, greedy=True, ignore_eos=True)
    half = args.prompts // 2
    with tempfile.TemporaryDirectory() as work:
        from trtpipe.export import export_model

        root = Path(work)
        model = make_model(root / "model")
        onnx_path = export_model(str(model), root / "onnx", task="text-generation-with-past")
        whole = build(onnx_path, root / "whole", 0)
        staged = build(onnx_path, root / "pp2", 2)
        cpu2 = [Device("cpu", 0), Device("cpu", 1)]
        runners = {
            "staged, interleave=1": Generator(staged, cpu2, interleave=1),
            "staged, interleave=2": Generator(staged, cpu2, interleave=2),
            "unsplit, 1 worker": Generator(whole, [Device("cpu", 0)]),
        }
        rates: dict[str, list[float]] = {name: [] for name in runners}
        bubbles: dict[str, list[list[float]]] = {name: [] for name in runners}
        tokens: dict[str, list[list[int]]] = {}
        try:
            for name, gen in runners.items():  # warm-up
                tokens[name] = [r.token_ids for r in gen.generate(prompts, params, half)]
            for _ in range(args.runs):
                for name, gen in runners.items():
                    stages = getattr(gen.sessions[0], "stages", [])
                    busy = [s.busy_s for s in stages]
                    start = time.perf_counter()
                    run = gen.run(prompts, params, half)
                    wall = time.perf_counter() - start
                    rates[name].append(run.generated_tokens / wall)
                    bubbles[name].append(
                        [1 - (s.busy_s - b) / wall for s, b in zip(stages, busy, strict=True)]
                    )
        finally:
            for gen in runners.values():
                gen.close()
    same = all(t == tokens["unsplit, 1 worker"] for t in tokens.values())
    base = statistics.median(rates["staged, interleave=1"])
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, chunks of {half}, "
          f"{args.runs} runs; greedy tokens equal across all three: {same}")  # fmt: skip
    print("| schedule | tokens/s | vs interleave=1 | bubble stage 0 / 1 |")
    print("|---|---|---|---|")
    for name in runners:
        rate = statistics.median(rates[name])
        parts = (
            [statistics.median(b[i] for b in bubbles[name]) for i in range(2)]
            if any(bubbles[name][0])
            else []
        )
        bubble = " / ".join(f"{100 * x:.0f}%" for x in parts) or "-"
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {bubble} |")


if __name__ == "__main__":
    main()
