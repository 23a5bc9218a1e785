"""Accuracy gate: an engine against its PyTorch model on the same inputs.

Per output: max abs / max rel error, min and mean cosine similarity per row, and top-1 agreement
for classification heads. Rows are sequences for pooled outputs and real (unpadded) tokens for
per-token outputs, so padding never hides or invents an error. The report and the row metrics
live in ``compare_report``; decoders and tensor models are compared in their own modules.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.compare_report import (  # noqa: F401 (re-exported)
    CompareReport,
    Tolerances,
    compare_outputs,
    cosine_rows,
    row_pairs,
    row_view,
)
from trtpipe.errors import InputError
from trtpipe.runners.base import Runner

log = logging.getLogger(__name__)


def random_feeds(
    runner: Runner, batch: int, seq: int, vocab: int, seed: int
) -> dict[str, np.ndarray]:
    """Random valid inputs: token ids within the vocabulary, full attention, zero type ids."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in runner.inputs:
        if spec.name == "input_ids":
            feeds[spec.name] = rng.integers(3, vocab, size=(batch, seq)).astype(spec.dtype)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((batch, seq), dtype=spec.dtype)
        else:
            feeds[spec.name] = np.zeros((batch, seq), dtype=spec.dtype)
    return feeds


def batches_from_texts(
    texts: list[str], engine_path: Path, runner: Runner, batch_size: int, max_length: int
) -> list[dict[str, np.ndarray]]:
    from trtpipe.text import encode, load_tokenizer

    tokenizer = load_tokenizer(str(engine_path))
    return [
        encode(tokenizer, texts[i : i + batch_size], runner.inputs, max_length=max_length)
        for i in range(0, len(texts), batch_size)
    ]


def run_compare(
    engine_runner: Runner,
    reference_runner: Runner,
    batches: list[dict[str, np.ndarray]],
    task: str,
    precision: str,
    tolerances: Tolerances,
    inputs_label: str,
) -> CompareReport:
    """Run both runners batch by batch and gate the differences."""
    engine_out, reference_out, masks = [], [], []
    for feeds in batches:
        engine_out.append(engine_runner.infer(feeds))
        reference_out.append(reference_runner.infer(feeds))
        masks.append(feeds.get("attention_mask"))
    outputs = compare_outputs(engine_out, reference_out, masks, task, tolerances)
    samples = sum(next(iter(b.values())).shape[0] for b in batches)
    passed = all(not r.failures for r in outputs.values())
    return CompareReport(passed, precision, outputs, tolerances, samples, inputs_label)


def compare_engine(
    engine: Any,
    tolerances: Tolerances,
    texts_file: Path | None = None,
    random_samples: int = 0,
    seq_len: int = 64,
    reference: str | None = None,
    batch_size: int = 16,
    device: Any = None,
) -> CompareReport:
    """The whole ``compare`` command: build inputs, load both runners, gate."""
    from trtpipe.generation.kv_cache import is_decoder
    from trtpipe.runners import runner_for
    from trtpipe.runners.torch import reference_runner
    from trtpipe.text import read_texts, sample_texts

    manifest = engine.manifest
    if is_decoder(manifest.inputs):
        from trtpipe.compare_decoder import compare_decoder_engine

        return compare_decoder_engine(
            engine,
            tolerances,
            texts_file,
            reference=reference,
            batch_size=batch_size,
            device=device,
            random_samples=random_samples,
        )
    if manifest.task == "tensor":
        from trtpipe.compare_tensor import compare_tensor_engine

        if texts_file is not None:
            raise InputError(f"{engine.path} takes plain tensors: use --random N or --inputs")
        return compare_tensor_engine(
            engine, tolerances, random_samples, None, reference, batch_size, device
        )
    if random_samples < 0 or seq_len < 1 or batch_size < 1:
        raise InputError("--random must be >= 0, --seq-len and --batch-size >= 1")
    batch_size = min(batch_size, manifest.max_batch_size)
    max_length = min((r.max[1] for r in manifest.profile.values() if len(r.max) > 1), default=512)
    texts = None
    if not random_samples:
        if not engine.has_tokenizer():
            raise InputError(f"{engine.path} has no tokenizer: use --random N")
        texts = read_texts(texts_file) if texts_file else sample_texts()
    with runner_for(engine, device) as engine_runner, reference_runner(manifest, reference) as ref:
        if texts is None:
            vocab = vocab_size(engine.path)
            batches = [
                random_feeds(engine_runner, min(batch_size, random_samples - i), seq_len, vocab, i)
                for i in range(0, random_samples, batch_size)
            ]
            label = f"random inputs, seq {seq_len}"
        else:
            label = f"texts from {texts_file}" if texts_file else "built-in sentences"
            batches = batches_from_texts(texts, engine.path, engine_runner, batch_size, max_length)
        report = run_compare(
            engine_runner, ref, batches, manifest.task, manifest.precision, tolerances, label
        )
    if manifest.backend == "onnxruntime" and manifest.precision == "int8":
        from trtpipe.cpu_features import int8_kernel_family

        report.cpu_int8_family = int8_kernel_family()
    return report


def vocab_size(engine_path: Path) -> int:
    config = engine_path / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("vocab_size", 1000))
    return 1000
