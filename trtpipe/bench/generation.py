"""Generation mode: engine tokens/s and time-to-first-token against HF ``generate``.

The measuring is done by ``trtpipe.generation.bench`` (same prompts, same batch chunks, greedy,
exactly ``max_new_tokens`` per prompt on both sides); this module runs both per batch size in one
command, alternating which goes first, and shapes the report like the other modes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trtpipe.bench.common import default_device
from trtpipe.bench.stats import ratio
from trtpipe.devices import cpu_cores, parse_device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError

log = logging.getLogger(__name__)


def run_generation(
    engine_dir: Path,
    prompts_file: Path | None,
    max_new_tokens: int,
    batch_sizes: list[int],
    runs: int,
    warmup: int,
    device: str | None = None,
    reference: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """One row per batch size: both sides' tokens/s and TTFT, and the ratios."""
    try:
        from trtpipe.generation.bench import benchmark_generation, hf_generate_baseline
    except ImportError as exc:
        raise InputError(
            f"generation benchmarks need trtpipe.generation, which is not available ({exc})"
        ) from exc
    from trtpipe.bench.report import machine_info
    from trtpipe.bench.suite import engine_summary
    from trtpipe.text import read_texts, sample_texts

    engine = EngineDir(engine_dir)
    if "text-generation" not in engine.manifest.task:
        raise InputError(
            f"{engine.path} is a {engine.manifest.task} engine; --generate needs a "
            "text-generation engine (export a decoder model)"
        )
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    too_big = [b for b in batch_sizes if b > engine.manifest.max_batch_size]
    if too_big:
        raise InputError(
            f"--batch-sizes {too_big} exceed the engine's maximum batch "
            f"{engine.manifest.max_batch_size}"
        )
    prompts = read_texts(prompts_file) if prompts_file else sample_texts()
    target = parse_device(device) if device else default_device(engine.manifest)
    threads = threads or cpu_cores()
    model_dir = reference or engine.manifest.source_model
    if not model_dir:
        raise InputError("the manifest names no source model; pass --reference MODEL_DIR")
    if not Path(model_dir).exists():
        from trtpipe.export import resolve_model

        model_dir = str(resolve_model(model_dir))
    import torch

    torch.set_num_threads(threads)
    runs = max(1, min(runs, 3))  # whole generations are long; three runs give a median
    torch_device = f"cuda:{target.index}" if target.is_gpu else "cpu"
    rows = []
    for k, batch in enumerate(batch_sizes):

        def run_engine(batch: int = batch) -> dict[str, Any]:
            return benchmark_generation(
                engine.path, prompts, batch, max_new_tokens, [target], runs, warmup, threads
            )

        def run_hf(batch: int = batch) -> dict[str, Any]:
            return hf_generate_baseline(
                model_dir, prompts, batch, max_new_tokens, runs, warmup, torch_device
            )

        if k % 2 == 0:
            eng, base = run_engine(), run_hf()
        else:
            base, eng = run_hf(), run_engine()
        rows.append(
            {
                "batch_size": batch,
                "engine": eng,
                "baseline": base,
                "engine_tokens_per_s": eng["tokens_per_s"],
                "baseline_tokens_per_s": base["tokens_per_s"],
                "speedup": ratio(eng["tokens_per_s"], base["tokens_per_s"]),
                "ttft_speedup": ratio(base["ttft_ms_p50"], eng["ttft_ms_p50"]),
            }
        )
        log.info(
            "batch %d: engine %.1f tok/s, HF generate %.1f tok/s",
            batch,
            eng["tokens_per_s"],
            base["tokens_per_s"],
        )
    return {
        "kind": "generation",
        "machine": machine_info(),
        "engine": engine_summary(engine),
        "settings": {
            "device": str(target),
            "threads": threads,
            "runs": runs,
            "warmup": warmup,
            "baseline": f"HF generate ({torch_device})",
        },
        "generation": {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "rows": rows},
    }
