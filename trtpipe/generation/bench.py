"""Generation measurements: engine tokens/s and time-to-first-token vs HF ``generate``.

Both sides decode greedily for exactly ``max_new_tokens`` tokens per prompt (EOS ignored), with
left padding and the same batch chunks, so tokens/s compare like for like. Reported figures are
medians over ``runs`` timed runs after ``warmup`` untimed ones.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trtpipe.devices import Device
from trtpipe.generation.prompts import chunks, left_pad, tokenize
from trtpipe.generation.sampling import SamplingParams


def benchmark_generation(
    engine_dir: str | Path,
    prompts: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    devices: Sequence[Device] | None = None,
    runs: int = 3,
    warmup: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Engine tokens/s (median of runs) and TTFT percentiles over every batch of every run."""
    from trtpipe.generation.generator import Generator

    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, ignore_eos=True)
    targets = list(devices or [Device("cpu", 0)])
    with Generator(engine_dir, targets, threads) as generator:
        for _ in range(warmup):
            generator.run(prompts, params, batch_size)
        rates, walls, ttfts = [], [], []
        tokens = 0
        token_ids: list[list[int]] = []
        for _ in range(runs):
            run = generator.run(prompts, params, batch_size)
            rates.append(run.tokens_per_s)
            walls.append(run.wall_s)
            ttfts.extend(run.ttft_s)
            tokens = run.generated_tokens
            token_ids = [list(r.token_ids) for r in run.results]
    return {
        "backend": "engine",
        "engine": str(engine_dir),
        "devices": [str(d) for d in targets],
        "prompts": len(prompts),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "generated_tokens": tokens,
        "runs": runs,
        "token_ids": token_ids,
        **timing_summary(rates, walls, ttfts),
    }


def hf_generate_baseline(
    model_dir: str | Path,
    prompts: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    runs: int = 3,
    warmup: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """PyTorch eager ``model.generate`` (greedy, left padding): the baseline users start from.

    TTFT is the time of a ``max_new_tokens=1`` generate on the same batch (prefill + 1 token).
    EOS neither stops nor is suppressed (``eos_token_id=None``), as on the engine side with
    ``ignore_eos``, so both sides pick the same argmax at every step and their tokens compare.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    model = model.to(device).eval()
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    batches: list[tuple[Any, Any]] = []
    for part in chunks(tokenize(tokenizer, prompts), batch_size):
        padded_ids, padded_mask = left_pad(part, pad)
        batches.append(
            (torch.from_numpy(padded_ids).to(device), torch.from_numpy(padded_mask).to(device))
        )

    def generate(ids: Any, mask: Any, new_tokens: int) -> list[list[int]]:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=pad,
        )
        return [list(map(int, row)) for row in out[:, ids.shape[1] :].tolist()]

    with torch.inference_mode():
        for _ in range(warmup):
            for ids, mask in batches:
                generate(ids, mask, max_new_tokens)
        rates, walls, ttfts = [], [], []
        tokens = 0
        token_ids: list[list[int]] = []
        for _ in range(runs):
            start = time.perf_counter()
            token_ids = [
                row for ids, mask in batches for row in generate(ids, mask, max_new_tokens)
            ]
            wall = time.perf_counter() - start
            tokens = sum(len(row) for row in token_ids)
            rates.append(tokens / wall)
            walls.append(wall)
            for ids, mask in batches:
                first = time.perf_counter()
                generate(ids, mask, 1)
                ttfts.append(time.perf_counter() - first)
    return {
        "backend": "hf-generate",
        "model": str(model_dir),
        "devices": [device],
        "prompts": len(prompts),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "generated_tokens": tokens,
        "runs": runs,
        "token_ids": token_ids,
        **timing_summary(rates, walls, ttfts),
    }


def token_agreement(
    engine: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """How far the engine's greedy tokens equal the reference's, prompt by prompt.

    ``match`` is exact equality of every prompt's tokens; ``fraction`` counts equal tokens at
    equal positions (a missing token counts as unequal); ``first_mismatch`` is the earliest
    (prompt, token) where they part, or None.
    """
    if len(engine) != len(reference):
        raise ValueError(f"{len(engine)} engine rows vs {len(reference)} reference rows")
    equal = total = 0
    first: dict[str, int] | None = None
    for prompt, (got, want) in enumerate(zip(engine, reference, strict=True)):
        total += max(len(got), len(want))
        same = [a == b for a, b in zip(got, want, strict=False)]
        equal += sum(same)
        if first is None and (not all(same) or len(got) != len(want)):
            position = same.index(False) if not all(same) else min(len(got), len(want))
            first = {"prompt": prompt, "token": position}
    return {
        "match": first is None,
        "fraction": equal / total if total else 1.0,
        "first_mismatch": first,
    }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def timing_summary(rates: list[float], walls: list[float], ttfts: list[float]) -> dict[str, float]:
    """Median tokens/s and wall time of the runs; time to first token p50/p90 in ms."""
    return {
        "tokens_per_s": statistics.median(rates),
        "wall_s": statistics.median(walls),
        "ttft_ms_p50": 1000 * statistics.median(ttfts),
        "ttft_ms_p90": 1000 * percentile(ttfts, 90),
    }
