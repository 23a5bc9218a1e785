"""Decoder accuracy gate figures: tiny Llama and GPT-2, random and trained, fp32/fp16/int8.

Reproduces the table in docs/precision.md (section "Decoder engines"):

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/decoder_gate.py --work /tmp/decoder-gate \
        --json decoder_gate.json

Random models are the ones the tests make (tests/decoders.py); trained ones are trained on the
bundled bench corpus for a fixed number of steps (tests/trained_lm.py). Every engine is gated
with ``trtpipe compare``'s defaults (built-in sentences, 16 teacher-forced steps) on ONNX
Runtime CPU. Work dirs are reused when present, so a second run only re-gates.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.decoders import save_tiny_gpt2, save_tiny_llama
from tests.trained_lm import build_decoder, export_decoder, train_tiny_lm

RANDOM = {"llama": save_tiny_llama, "gpt2": save_tiny_gpt2}


def model_dir(work: Path, arch: str, weights: str, steps: int, batch: int) -> Path:
    target = work / f"{arch}-{weights}" / "model"
    if (target / "config.json").is_file():
        return target
    if weights == "trained":
        return train_tiny_lm(target, arch, steps=steps, batch=batch)
    return RANDOM[arch](target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("decoder-gate"))
    parser.add_argument("--arch", default="llama,gpt2")
    parser.add_argument("--weights", default="random,trained")
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--train-steps", type=int, default=200, help="Training steps.")
    parser.add_argument("--train-batch", type=int, default=16, help="Blocks per training step.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from trtpipe.compare_decoder import DecoderTolerances, compare_decoder_engine
    from trtpipe.engine import EngineDir

    rows = []
    for arch in args.arch.split(","):
        for weights in args.weights.split(","):
            model = model_dir(args.work, arch, weights, args.train_steps, args.train_batch)
            onnx_dir = args.work / f"{arch}-{weights}" / "onnx"
            onnx_path = (
                onnx_dir / "model.onnx"
                if (onnx_dir / "model.onnx").is_file()
                else export_decoder(model, onnx_dir)
            )
            for precision in args.precisions.split(","):
                engine_dir = args.work / f"{arch}-{weights}" / f"engine-{precision}"
                if not (engine_dir / "manifest.json").is_file():
                    start = time.perf_counter()
                    build_decoder(onnx_path, engine_dir, precision)
                    print(f"built {engine_dir} in {time.perf_counter() - start:.0f} s")
                report = compare_decoder_engine(
                    EngineDir(engine_dir), DecoderTolerances.for_precision(precision)
                )
                logits = report.outputs["logits"]
                row = {
                    "model": f"{arch} {weights}",
                    "precision": precision,
                    "top1": logits.top1_agreement,
                    "cosine_min": logits.cosine_min,
                    "cosine_mean": logits.cosine_mean,
                    "max_abs": logits.max_abs,
                    "greedy_match": report.greedy.match_rate,
                    "greedy_exact": f"{report.greedy.exact}/{report.samples}",
                    "flip_margin_max": report.disagreement_margin_max,
                    "passed": report.passed,
                    "loss": (model / "train_loss.txt").read_text().strip()
                    if (model / "train_loss.txt").is_file()
                    else None,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(
        "| model | precision | top-1 | cos min | cos mean | max abs | greedy match | exact | gate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['precision']} | {100 * r['top1']:.1f}% | "
            f"{r['cosine_min']:.6f} | {r['cosine_mean']:.6f} | {r['max_abs']:.3g} | "
            f"{100 * r['greedy_match']:.1f}% | {r['greedy_exact']} | "
            f"{'pass' if r['passed'] else 'FAIL'} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
