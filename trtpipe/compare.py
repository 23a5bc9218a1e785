"""Accuracy gate: an engine against its PyTorch model on the same inputs.

Per output: max abs / max rel error, min and mean cosine similarity per row, and top-1 agreement
for classification heads. Rows are sequences for pooled outputs and real (unpadded) tokens for
per-token outputs, so padding never hides or invents an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.errors import InputError
from trtpipe.runners.base import Runner

log = logging.getLogger(__name__)

CLASSIFICATION_TASKS = ("text-classification", "token-classification", "question-answering")


@dataclass
class Tolerances:
    """Gate thresholds; ``None`` means not gated."""

    max_abs: float | None = None
    cosine_min: float | None = None
    cosine_mean: float | None = None
    top1_min: float | None = None

    @classmethod
    def for_precision(cls, precision: str) -> Tolerances:
        if precision == "fp32":
            return cls(max_abs=1e-4, top1_min=1.0)
        if precision == "fp16":
            return cls(cosine_min=0.999, top1_min=0.98)
        if precision == "int8":
            return cls(cosine_mean=0.99, cosine_min=0.97, top1_min=0.98)
        raise InputError(f"unknown precision {precision!r}")


@dataclass
class OutputReport:
    max_abs: float
    max_rel: float
    cosine_min: float
    cosine_mean: float
    rows: int
    top1_agreement: float | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class CompareReport:
    passed: bool
    precision: str
    outputs: dict[str, OutputReport]
    tolerances: Tolerances
    samples: int
    inputs: str
    # int8 engines on ONNX Runtime: the CPU int8 kernel family this gate ran on
    # (trtpipe.cpu_features); the result holds for that family only. None otherwise.
    cpu_int8_family: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "precision": self.precision,
            "samples": self.samples,
            "inputs": self.inputs,
            "cpu_int8_family": self.cpu_int8_family,
            "tolerances": asdict(self.tolerances),
            "outputs": {name: asdict(r) for name, r in self.outputs.items()},
        }

    def write_json(self, path: Path) -> None:
        from trtpipe.jsonfile import write_json

        write_json(path, self.to_dict())

    def table(self) -> str:
        from trtpipe.inspect import table

        rows = []
        for name, r in self.outputs.items():
            top1 = "-" if r.top1_agreement is None else f"{100 * r.top1_agreement:.1f}%"
            rows.append(
                [
                    name,
                    f"{r.max_abs:.3g}",
                    f"{r.max_rel:.3g}",
                    f"{r.cosine_min:.6f}",
                    f"{r.cosine_mean:.6f}",
                    top1,
                    "ok" if not r.failures else "FAIL",
                ]
            )
        header = ["output", "max_abs", "max_rel", "cos_min", "cos_mean", "top1", "gate"]
        lines = [table(rows, header)]
        for name, r in self.outputs.items():
            lines.extend(f"  {name}: {msg}" for msg in r.failures)
        verdict = "PASSED" if self.passed else "FAILED"
        family = f", {self.cpu_int8_family} int8 kernels" if self.cpu_int8_family else ""
        lines.append(f"{verdict} ({self.precision}, {self.samples} samples, {self.inputs}{family})")
        return "\n".join(lines)


def row_view(value: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """2-D (rows, features): per-token outputs keep only real tokens."""
    value = value.astype(np.float64)
    if value.ndim >= 3 and mask is not None and value.shape[:2] == mask.shape:
        return value[mask.astype(bool)].reshape(int(mask.sum()), -1)
    if value.ndim == 1:
        return value.reshape(-1, 1)
    return value.reshape(value.shape[0], -1)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dot = np.sum(a * b, axis=1)
    both_zero = norm == 0
    return np.where(both_zero, 1.0, dot / np.where(both_zero, 1.0, norm))


def top1_rows(value: np.ndarray, mask: np.ndarray | None, task: str) -> np.ndarray:
    """Predicted class per row: per token for token-classification, per span end for QA."""
    if task == "question-answering" and mask is not None and value.shape == mask.shape:
        masked = np.where(mask.astype(bool), value, -np.inf)
        return np.asarray(np.argmax(masked, axis=-1))
    if value.ndim == 3 and mask is not None:
        return np.asarray(np.argmax(value[mask.astype(bool)], axis=-1))
    return np.asarray(np.argmax(value.reshape(value.shape[0], -1), axis=-1))


def compare_outputs(
    engine_out: list[dict[str, np.ndarray]],
    reference_out: list[dict[str, np.ndarray]],
    masks: list[np.ndarray | None],
    task: str,
    tolerances: Tolerances,
) -> dict[str, OutputReport]:
    """Metrics per output over all batches, with gate failures spelled out."""
    reports: dict[str, OutputReport] = {}
    for name in reference_out[0]:
        diffs, rels, cosines, agree = [], [], [], []
        for eng, ref, mask in zip(engine_out, reference_out, masks, strict=True):
            if eng[name].shape != ref[name].shape:
                raise InputError(
                    f"output {name!r}: engine shape {eng[name].shape} "
                    f"!= reference {ref[name].shape}"
                )
            for a, b in row_pairs(eng[name], ref[name], mask):
                diff = np.abs(a - b)
                diffs.append(diff.ravel())
                rels.append((diff / np.maximum(np.abs(b), 1e-6)).ravel())
                cosines.append(cosine_rows(a, b))
            if task in CLASSIFICATION_TASKS:
                agree.append(top1_rows(eng[name], mask, task) == top1_rows(ref[name], mask, task))
        diff_all, cos = np.concatenate(diffs), np.concatenate(cosines)
        report = OutputReport(
            max_abs=float(diff_all.max()),
            max_rel=float(np.concatenate(rels).max()),
            cosine_min=float(cos.min()),
            cosine_mean=float(cos.mean()),
            rows=int(cos.shape[0]),
            top1_agreement=float(np.concatenate(agree).mean()) if agree else None,
        )
        report.failures = gate_failures(report, tolerances)
        reports[name] = report
    return reports


def row_pairs(
    engine: np.ndarray, reference: np.ndarray, mask: np.ndarray | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(engine rows, reference rows) blocks to compare.

    Per-token scalars ([B, S] like QA start/end logits) give one row per sequence holding only
    its real tokens, so sequences of different padded lengths compare correctly.
    """
    if mask is not None and engine.ndim == 2 and engine.shape == mask.shape:
        keep = mask.astype(bool)
        return [
            (
                engine[i][keep[i]].astype(np.float64)[None],
                reference[i][keep[i]].astype(np.float64)[None],
            )
            for i in range(engine.shape[0])
        ]
    return [(row_view(engine, mask), row_view(reference, mask))]


def gate_failures(report: OutputReport, tol: Tolerances) -> list[str]:
    failures = []
    if tol.max_abs is not None and report.max_abs > tol.max_abs:
        failures.append(f"max_abs {report.max_abs:.3g} > {tol.max_abs:g}")
    if tol.cosine_min is not None and report.cosine_min < tol.cosine_min:
        failures.append(f"cosine_min {report.cosine_min:.6f} < {tol.cosine_min:g}")
    if tol.cosine_mean is not None and report.cosine_mean < tol.cosine_mean:
        failures.append(f"cosine_mean {report.cosine_mean:.6f} < {tol.cosine_mean:g}")
    if (
        tol.top1_min is not None
        and report.top1_agreement is not None
        and report.top1_agreement < tol.top1_min
    ):
        failures.append(f"top1_agreement {report.top1_agreement:.4f} < {tol.top1_min:g}")
    return failures


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
