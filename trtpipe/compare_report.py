"""What the accuracy gate reports and how it scores one output: tolerances, per-output and
whole reports, and the row metrics (errors, cosine, top-1) over real rows only.

Kept apart from ``compare`` so that the per-model comparisons (``compare_decoder``,
``compare_tensor``) use it without importing the module that dispatches to them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.errors import InputError

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
