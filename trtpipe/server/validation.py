"""The one validation of a tensor request: names, datatypes, shapes, profile limits, id ranges.

A request is checked here once, on arrival, with messages that name the input and the allowed
range; what passes is handed to the batcher as already-validated feeds (contiguous arrays of
the engine's dtypes), so the batcher does not check it again. The runner still checks each
launched batch, which protects the engine, not the request.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trtpipe.engine import ShapeRange, TensorSpec
from trtpipe.server.protocol import InferRequest, ProtocolError, v2_datatype

TEXT_INPUT = "text"  # the BYTES input a text model accepts, advertised in its metadata


def id_limits(engine_path: Path) -> dict[str, int]:
    """Embedding-table sizes from the engine's config.json: ids must stay below them."""
    try:
        config = json.loads((engine_path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    limits = {
        "input_ids": config.get("vocab_size"),
        "token_type_ids": config.get("type_vocab_size"),
    }
    return {k: int(v) for k, v in limits.items() if isinstance(v, int) and v > 0}


class TensorChecker:
    """Checks decoded v2 tensors against one model's specs, profile and batch limit."""

    def __init__(
        self,
        model: str,
        inputs: list[TensorSpec],
        profile: dict[str, ShapeRange],
        max_batch_size: int,
        limits: dict[str, int],
        text_model: bool = False,
    ):
        self.model = model
        self.specs = {s.name: s for s in inputs}
        self.profile = profile
        self.max_batch_size = max_batch_size
        self.limits = limits
        self.text_model = text_model
        self._datatypes = {s.name: v2_datatype(s.dtype) for s in inputs}

    def check(self, request: InferRequest) -> dict[str, np.ndarray]:
        """Feeds for the batcher, or a ProtocolError that says what to fix."""
        feeds: dict[str, np.ndarray] = {}
        batch: int | None = None
        for tensor in request.inputs:
            spec = self.specs.get(tensor.name)
            if spec is None:
                hint = f" (or a single BYTES input {TEXT_INPUT!r})" if self.text_model else ""
                raise ProtocolError(
                    f"unknown input {tensor.name!r} for model {self.model!r}; it takes "
                    f"{sorted(self.specs)}{hint}"
                )
            want = self._datatypes[tensor.name]
            if tensor.datatype != want:
                raise ProtocolError(
                    f"input {tensor.name!r} has datatype {tensor.datatype}, model "
                    f"{self.model!r} expects {want}"
                )
            shape = list(tensor.shape)
            if len(shape) != len(spec.shape):
                raise ProtocolError(
                    f"input {tensor.name!r} has shape {shape}, model {self.model!r} "
                    f"expects rank {len(spec.shape)} ({spec.shape}, -1 = any)"
                )
            for axis, (got, fixed) in enumerate(zip(shape, spec.shape, strict=True)):
                if fixed >= 0 and got != fixed:
                    raise ProtocolError(
                        f"input {tensor.name!r} dim {axis} is {got}, model {self.model!r} "
                        f"requires {fixed}"
                    )
            self._check_limits(tensor.name, shape)
            if shape and spec.dims[:1] == ["batch"]:
                if batch is not None and shape[0] != batch:
                    raise ProtocolError(
                        f"inputs disagree on batch size ({batch} vs {shape[0]} in {tensor.name!r})"
                    )
                batch = shape[0]
            feeds[tensor.name] = np.ascontiguousarray(tensor.data, dtype=spec.dtype)
        missing = sorted(set(self.specs) - set(feeds))
        if missing:
            raise ProtocolError(f"missing input(s) {missing} for model {self.model!r}")
        for name, limit in self.limits.items():
            values = feeds.get(name)
            if values is not None and values.size and (values.min() < 0 or values.max() >= limit):
                # An id outside the embedding table crashes the kernel (or reads out of bounds
                # on a GPU) and would fail every request batched with this one.
                raise ProtocolError(
                    f"input {name!r} holds values outside 0..{limit - 1} "
                    f"(model {self.model!r} has {limit} entries)"
                )
        return feeds

    def _check_limits(self, name: str, shape: list[int]) -> None:
        shape_range = self.profile.get(name)
        if shape_range is None or len(shape_range.max) != len(shape):
            return
        if shape and shape[0] > self.max_batch_size:
            raise ProtocolError(
                f"input {name!r} has batch size {shape[0]}, model {self.model!r} accepts at "
                f"most {self.max_batch_size} per request"
            )
        for axis in range(1, len(shape)):
            low, high = shape_range.min[axis], shape_range.max[axis]
            if not low <= shape[axis] <= high:
                what = "sequence length" if axis == 1 else f"dim {axis}"
                raise ProtocolError(
                    f"input {name!r} has {what} {shape[axis]}, model {self.model!r} accepts "
                    f"{low}..{high} (rebuild with a larger profile, or send shorter input)"
                )
        if shape and shape[0] < shape_range.min[0]:
            raise ProtocolError(
                f"input {name!r} has batch size {shape[0]}, model {self.model!r} needs at least "
                f"{shape_range.min[0]}"
            )
