"""Export, build and generate with a random-weight Llama over 2 GB on the CPU (not CI).

Checks that the external-data path (weights in ``model.onnx_data``, protobuf's 2 GB limit)
holds end to end at a size where it matters, and what it costs in time and peak memory:

1. make-model: a random LlamaForCausalLM (hidden 2048, intermediate 5632, 10 layers, 32 heads,
   4 KV heads, 32k vocab: ~571M parameters, ~2.3 GB fp32) ``save_pretrained`` from a
   LlamaConfig, with a byte-level BPE tokenizer trained on the bundled bench corpus. Nothing is
   downloaded.
2. export: ``trtpipe export --task text-generation-with-past``.
3. build fp32, fp16 and int8 (``--int8-select proxy``: greedy selection at this size would take
   hours) on ONNX Runtime.
4. generate a few greedy tokens with each engine.

Every step is its own process under ``/usr/bin/time -v`` (so the HF model is gone before the
export reads it back, and the export's memory before the builds), and its wall time and peak
resident memory go into ``WORK/steps.json``. Steps whose output exists are skipped, so an
interrupted run resumes. Run with a hard limit, e.g.::

    timeout 3000 .venv/bin/python scripts/big_decoder.py --work /tmp/big-decoder

The figures are in docs/generation.md ("A decoder over 2 GB").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRTPIPE = [sys.executable, "-m", "trtpipe.cli.main"]
PRECISIONS = ("fp32", "fp16", "int8")
# The engines' profile: calibration and reference runs take up to this many sentences.
MAX_SHAPES = "input_ids:4x256"
PROMPTS = ("The King is dead. Long live", "Engines generate text one token")
NEW_TOKENS = 8


def make_model(target: Path) -> None:
    """Random Llama (~2.3 GB fp32) and a tokenizer trained on the bench corpus, saved."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines = [
        line.strip()
        for line in (ROOT / "trtpipe/data/bench_corpus.txt").read_text().splitlines()
        if line.strip()
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    target.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    ).save_pretrained(target)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=10,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(target)
    print(f"saved {params / 1e6:.0f}M parameters ({params * 4 / 1e9:.2f} GB fp32) to {target}")


def cpu_seconds(stderr: str) -> float | None:
    """User + system CPU seconds from ``/usr/bin/time -v`` output (less than wall time when the
    process waited for a shared CPU or the disk)."""
    found = re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", stderr)
    return round(sum(float(v) for v in found), 1) if found else None


def peak_and_wall(stderr: str) -> tuple[float | None, float | None]:
    """(max RSS in GiB, elapsed seconds) from ``/usr/bin/time -v`` output."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    seconds = None
    if wall:
        seconds = 0.0
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
    return (int(rss.group(1)) / 2**20 if rss else None), seconds


def run_step(name: str, command: list[str], work: Path, record: dict) -> bool:
    """Run ``command`` under /usr/bin/time -v; record wall time, peak RSS and the exit code."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    log_path = work / f"{name}.log"
    start = time.time()
    with log_path.open("w") as log:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *command],
            stdout=log,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        log.write(proc.stderr)
    peak, wall = peak_and_wall(proc.stderr)
    record[name] = {
        "command": " ".join(command),
        "returncode": proc.returncode,
        "wall_s": round(wall if wall is not None else time.time() - start, 1),
        "cpu_s": cpu_seconds(proc.stderr),
        "peak_rss_gib": round(peak, 2) if peak is not None else None,
    }
    print(f"   -> rc {proc.returncode}, {record[name]}", flush=True)
    if proc.returncode != 0:
        tail = [line for line in log_path.read_text().splitlines() if line.strip()][-25:]
        print("\n".join(tail), flush=True)
    (work / "steps.json").write_text(json.dumps(record, indent=2) + "\n")
    return proc.returncode == 0


def dir_listing(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/big-decoder"))
    parser.add_argument("--make-model", type=Path, help=argparse.SUPPRESS)  # the child step
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    args = parser.parse_args()
    if args.make_model:
        make_model(args.make_model)
        return 0
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps_file = work / "steps.json"
    record: dict = json.loads(steps_file.read_text()) if steps_file.is_file() else {}
    model, export = work / "model", work / "export"
    has_model = (model / "config.json").is_file() and any(model.glob("*.safetensors"))
    make = [sys.executable, __file__, "--make-model", str(model)]
    if not has_model and not run_step("make-model", make, work, record):
        return 1
    if not (export / "model.onnx").is_file():
        command = [*TRTPIPE, "export", str(model), "--task", "text-generation-with-past"]
        if not run_step("export", [*command, "-o", str(export)], work, record):
            return 1
    record["export_files"] = dir_listing(export)
    failed = False
    for precision in filter(None, args.precisions.split(",")):
        engine = work / f"engine-{precision}"
        if not (engine / "manifest.json").is_file():
            command = [*TRTPIPE, "build", str(export / "model.onnx"), f"--{precision}"]
            command += ["--backend", "onnxruntime", "--max-shapes", MAX_SHAPES, "-o", str(engine)]
            if precision == "int8":
                command += ["--int8-select", "proxy"]
            if not run_step(f"build-{precision}", command, work, record):
                failed = True
                continue
        record[f"engine_files-{precision}"] = dir_listing(engine)
        result = work / f"generate-{precision}.json"
        command = [*TRTPIPE, "generate", str(engine), "--greedy", "--ignore-eos"]
        command += ["--max-new-tokens", str(NEW_TOKENS), "--json", str(result)]
        for prompt in PROMPTS:
            command += ["--prompt", prompt]
        if not result.is_file() and not run_step(f"generate-{precision}", command, work, record):
            failed = True
    # Nothing half-written or stray beside the outputs: only what the steps produced.
    record["work_dir"] = sorted(p.name for p in work.iterdir())
    steps_file.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
