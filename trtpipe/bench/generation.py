"""Generation mode: engine tokens/s and time-to-first-token against HF ``generate``.

The measuring is done by ``trtpipe.generation.bench`` (same prompts, same batch chunks, greedy,
exactly ``max_new_tokens`` per prompt on both sides); this module runs both per batch size in one
command, alternating which goes first, and shapes the report like the other modes. A speedup
means something only if both sides produced the same tokens: each row reports whether the
engine's greedy tokens equal HF's, and a mismatch is logged as a warning.
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
    baseline: str = "torch",
) -> dict[str, Any]:
    """One row per batch size: both sides' tokens/s and TTFT, the ratios and token agreement.

    ``baseline="none"`` times the engine alone (no HF model is loaded).
    """
    if baseline not in ("torch", "none"):
        raise InputError(f"unknown baseline {baseline!r}; use torch or none")
    try:
        from trtpipe.generation.bench import (
            benchmark_generation,
            hf_generate_baseline,
            token_agreement,
        )
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
    with_hf = baseline == "torch"
    model_dir = reference or engine.manifest.source_model
    if with_hf and not model_dir:
        raise InputError("the manifest names no source model; pass --reference MODEL_DIR")
    if with_hf and not Path(model_dir).exists():
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

        base: dict[str, Any] | None = None
        if not with_hf:
            eng = run_engine()
        elif k % 2 == 0:
            eng, base = run_engine(), run_hf()
        else:
            base, eng = run_hf(), run_engine()
        engine_ids = eng.pop("token_ids")
        tokens = None
        if base is not None:
            tokens = token_agreement(engine_ids, base.pop("token_ids"))
            if not tokens["match"]:
                mismatch = tokens["first_mismatch"]
                log.warning(
                    "batch %d: the engine's greedy tokens differ from HF generate's "
                    "(%.1f%% equal; first at prompt %d, token %d)%s",
                    batch,
                    100 * tokens["fraction"],
                    mismatch["prompt"],
                    mismatch["token"],
                    ""
                    if engine.manifest.precision == "fp32"
                    else f" ({engine.manifest.precision} engine vs the fp32 model)",
                )
        rows.append(
            {
                "batch_size": batch,
                "engine": eng,
                "baseline": base,
                "engine_tokens_per_s": eng["tokens_per_s"],
                "baseline_tokens_per_s": base["tokens_per_s"] if base else None,
                "speedup": ratio(eng["tokens_per_s"], base["tokens_per_s"]) if base else None,
                "ttft_speedup": ratio(base["ttft_ms_p50"], eng["ttft_ms_p50"]) if base else None,
                "tokens_match_hf": tokens["match"] if tokens else None,
                "token_agreement": tokens,
            }
        )
        log.info(
            "batch %d: engine %.1f tok/s, HF generate %s tok/s",
            batch,
            eng["tokens_per_s"],
            f"{base['tokens_per_s']:.1f}" if base else "-",
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
            "baseline": f"HF generate ({torch_device})" if with_hf else None,
        },
        "generation": {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "rows": rows},
    }
