"""Padding requests of different lengths into one launch, and cutting each one's rows back out.

Which axes are batch and sequence axes comes from the engine's specs (``dims``), so this works
for any tensor layout, e.g. ``[B, S]`` ids, ``[B, S, H]`` token outputs, ``[B, H]`` pooled ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trtpipe.engine import TensorSpec
from trtpipe.errors import RunnerError


class Layout:
    """Which axes of which tensors are batch and sequence axes, from the engine specs."""

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec], profile: Any):
        self.inputs = inputs
        self.outputs = {spec.name: spec for spec in outputs}
        self.batchable = bool(inputs) and all(s.dims[:1] == ["batch"] for s in inputs)
        self.seq_axes = {
            s.name: [i for i, d in enumerate(s.dims) if d == "sequence"] for s in inputs
        }
        self.out_seq_axes = {
            s.name: [i for i, d in enumerate(s.dims) if d == "sequence"] for s in outputs
        }
        limits = [
            profile[name].max[axis]
            for name, axes in self.seq_axes.items()
            for axis in axes
            if name in profile
        ]
        self.max_seq = min(limits) if limits else None


def pad_and_stack(
    layout: Layout,
    parts: list[tuple[dict[str, np.ndarray], int]],
    padded: int,
    pad_ids: dict[str, int],
    right: bool = True,
) -> dict[str, np.ndarray]:
    """Concatenate ``(feeds, rows)`` parts, padding sequence axes to ``padded``."""
    if len(parts) == 1 and all(
        parts[0][0][name].shape[axis] == padded
        for name, axes in layout.seq_axes.items()
        for axis in axes
    ):
        return parts[0][0]
    total = sum(rows for _, rows in parts)
    feeds: dict[str, np.ndarray] = {}
    for spec in layout.inputs:
        arrays = [part[spec.name] for part, _ in parts]
        axes = layout.seq_axes[spec.name]
        if not axes or all(a.shape[axis] == padded for a in arrays for axis in axes):
            feeds[spec.name] = np.concatenate(arrays, axis=0)
            continue
        shape = list(arrays[0].shape)
        shape[0] = total
        for axis in axes:
            shape[axis] = padded
        out = np.full(shape, pad_ids.get(spec.name, 0), dtype=arrays[0].dtype)
        row = 0
        for array in arrays:
            index: list[slice] = [slice(None)] * array.ndim
            index[0] = slice(row, row + array.shape[0])
            for axis in axes:
                length = array.shape[axis]
                index[axis] = slice(0, length) if right else slice(padded - length, padded)
            out[tuple(index)] = array
            row += array.shape[0]
        feeds[spec.name] = out
    return feeds


def split_outputs(
    layout: Layout,
    outputs: dict[str, np.ndarray],
    parts: list[tuple[int, int]],
    padded: int,
    right: bool = True,
) -> list[dict[str, np.ndarray]]:
    """Each ``(rows, seq_len)`` part's own rows; per-token outputs cut back to its length."""
    if len(parts) == 1 and parts[0][1] == padded:
        return [outputs]
    total = sum(rows for rows, _ in parts)
    results: list[dict[str, np.ndarray]] = [{} for _ in parts]
    for name, array in outputs.items():
        spec = layout.outputs.get(name)
        batched = (spec.dims[:1] == ["batch"]) if spec else array.shape[:1] == (total,)
        if batched and array.shape[0] != total:
            raise RunnerError(f"output {name!r} has {array.shape[0]} rows for a batch of {total}")
        axes = [a for a in layout.out_seq_axes.get(name, []) if array.shape[a] == padded]
        row = 0
        for (rows, length), result in zip(parts, results, strict=True):
            if not batched:
                result[name] = array
                continue
            index: list[slice] = [slice(None)] * array.ndim
            index[0] = slice(row, row + rows)
            if length < padded:
                for axis in axes:
                    index[axis] = slice(0, length) if right else slice(padded - length, padded)
            result[name] = array[tuple(index)]
            row += rows
    return results
