"""ONNX I/O specs and optimization profiles (min/opt/max shapes per input).

Dynamic dims are classified by the names optimum gives them (``batch_size``,
``sequence_length``, ``past_sequence_length`` ...) so one batch/sequence range applies to every
input that shares the dim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtpipe.engine import ShapeRange, TensorSpec
from trtpipe.errors import InputError

ONNX_TO_NUMPY = {
    1: "float32",
    2: "uint8",
    3: "int8",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
}
DEFAULT_BATCH = (1, 8, 32)
DEFAULT_SEQUENCE = (1, 128, 512)
DEFAULT_PAST = (0, 128, 512)
PROFILE_OPTIONS = ("--min-shapes", "--opt-shapes", "--max-shapes")


def dim_kind(name: str) -> str:
    """batch | sequence | past | total | other, from an optimum dim name."""
    lowered = name.lower()
    if "batch" in lowered:
        return "batch"
    if "past" in lowered and "+" in lowered:
        return "total"
    if "past" in lowered:
        return "past"
    if "total" in lowered or "+" in lowered:
        return "total"
    if "sequence" in lowered or "seq" in lowered:
        return "sequence"
    return "other"


def onnx_io_specs(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs/outputs as TensorSpecs (initializers excluded)."""
    initializers = {init.name for init in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor_type = value.type.tensor_type
        dtype = ONNX_TO_NUMPY.get(tensor_type.elem_type)
        if dtype is None:
            raise InputError(
                f"tensor {value.name!r} has unsupported ONNX type {tensor_type.elem_type}"
            )
        shape, dims = [], []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(int(dim.dim_value))
                dims.append("")
            else:
                shape.append(-1)
                dims.append(dim_kind(dim.dim_param or "other"))
        return TensorSpec(value.name, dtype, shape, dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


def leading_batch_dims(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Plain (non-Hugging Face) tensors: a dynamic first dim of no known role is the batch."""
    relabelled = []
    for spec in specs:
        dims = list(spec.dims)
        if spec.shape and spec.shape[0] == -1 and dims[:1] == ["other"]:
            dims[0] = "batch"
        relabelled.append(TensorSpec(spec.name, spec.dtype, list(spec.shape), dims))
    return relabelled


@dataclass
class DimRanges:
    """min/opt/max per dim kind."""

    batch: tuple[int, int, int] = DEFAULT_BATCH
    sequence: tuple[int, int, int] = DEFAULT_SEQUENCE
    past: tuple[int, int, int] = DEFAULT_PAST


def parse_shapes(text: str | None) -> dict[str, list[int]]:
    """``input_ids:1x128,attention_mask:1x128`` -> {name: [1, 128]}."""
    if not text:
        return {}
    shapes: dict[str, list[int]] = {}
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")
        try:
            values = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v < 0 for v in values):
            raise InputError(f"bad shape {item!r}: use name:BxS, e.g. input_ids:8x128")
        if name in shapes and shapes[name] != values:
            first = "x".join(map(str, shapes[name]))
            raise InputError(
                f"{name} given twice ({name}:{first} and {item.strip()}); give it once"
            )
        shapes[name] = values
    return shapes


def max_positions(model_dir: Path) -> int | None:
    """The model's position limit from config.json, if it has one."""
    config = model_dir / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(data.get(key), int):
            return int(data[key])
    return None


def build_profile(
    inputs: list[TensorSpec],
    min_shapes: dict[str, list[int]],
    opt_shapes: dict[str, list[int]],
    max_shapes: dict[str, list[int]],
    position_limit: int | None = None,
) -> dict[str, ShapeRange]:
    """One optimization profile covering every dynamic input.

    Shapes the user gives for one input set the range of each dim kind it has, so the same
    batch and sequence ranges apply to every input (TensorRT requires them to agree).
    """
    names = {spec.name for spec in inputs}
    for given in (min_shapes, opt_shapes, max_shapes):
        unknown = sorted(set(given) - names)
        if unknown:
            raise InputError(f"shape given for unknown input(s) {unknown}; inputs: {sorted(names)}")
    ranges: dict[str, list[int]] = {
        "batch": list(DEFAULT_BATCH),
        "sequence": list(DEFAULT_SEQUENCE),
        "past": list(DEFAULT_PAST),
    }
    if position_limit:
        for kind in ("sequence", "past"):
            ranges[kind][2] = min(ranges[kind][2], position_limit)
            ranges[kind][1] = min(ranges[kind][1], ranges[kind][2])
    # (kind, slot) -> the input that set it: two inputs sharing a dim must give the same size.
    set_by: dict[tuple[str, int], str] = {}
    for slot, given in enumerate((min_shapes, opt_shapes, max_shapes)):
        for spec in inputs:
            if spec.name not in given:
                continue
            values = given[spec.name]
            if len(values) != len(spec.shape):
                raise InputError(
                    f"shape for {spec.name!r} has {len(values)} dims, "
                    f"the input has {len(spec.shape)}"
                )
            for kind, value in zip(spec.dims, values, strict=True):
                if kind not in ranges:
                    continue
                first = set_by.setdefault((kind, slot), spec.name)
                if first != spec.name and ranges[kind][slot] != value:
                    option = PROFILE_OPTIONS[slot]
                    raise InputError(
                        f"{option} gives {first} {kind} {ranges[kind][slot]} but "
                        f"{spec.name} {kind} {value}; inputs sharing the {kind} dim must agree"
                    )
                ranges[kind][slot] = value
    given_kinds = set(set_by)
    for kind, values in ranges.items():
        # A default opt outside a user-given max/min follows it instead of failing.
        if (kind, 1) not in given_kinds:
            values[1] = min(max(values[1], values[0]), values[2])
    for kind, (low, best, high) in ranges.items():
        if kind != "past":
            for label, value in (("maximum", high), ("minimum", low), ("optimum", best)):
                if value < 1:
                    raise InputError(f"{kind} {label} must be >= 1, got {value}")
        if not low <= best <= high:
            raise InputError(
                f"{kind} range must satisfy min <= opt <= max, got {low}/{best}/{high}"
            )
    if position_limit and ranges["sequence"][2] > position_limit:
        raise InputError(
            f"max sequence {ranges['sequence'][2]} exceeds the model's {position_limit} positions"
        )
    profile: dict[str, ShapeRange] = {}
    for spec in inputs:
        lo: list[int] = []
        opt: list[int] = []
        hi: list[int] = []
        for axis, (size, kind) in enumerate(zip(spec.shape, spec.dims, strict=True)):
            own = (
                other_dim_range(spec.name, axis, min_shapes, opt_shapes, max_shapes)
                if size < 0 and kind not in ranges
                else None
            )
            if size >= 0:
                lo.append(size)
                opt.append(size)
                hi.append(size)
            elif kind == "total":
                # past + new tokens can never exceed the model's positions.
                total_hi = ranges["sequence"][2] + ranges["past"][2]
                if position_limit:
                    total_hi = min(total_hi, position_limit)
                lo.append(ranges["sequence"][0] + ranges["past"][0])
                opt.append(min(ranges["sequence"][1] + ranges["past"][1], total_hi))
                hi.append(total_hi)
            elif own is not None:
                lo.append(own[0])
                opt.append(own[1])
                hi.append(own[2])
            elif kind in ranges:
                lo.append(ranges[kind][0])
                opt.append(ranges[kind][1])
                hi.append(ranges[kind][2])
            else:
                raise InputError(
                    f"input {spec.name!r} has a dynamic dim {axis} of unknown role; give its "
                    "range with --min-shapes/--opt-shapes/--max-shapes (at least --max-shapes)"
                )
        profile[spec.name] = ShapeRange(lo, opt, hi)
    return profile


def other_dim_range(
    name: str,
    axis: int,
    min_shapes: dict[str, list[int]],
    opt_shapes: dict[str, list[int]],
    max_shapes: dict[str, list[int]],
) -> tuple[int, int, int] | None:
    """min/opt/max of one input's dim of no known role, from the shapes given for that input.

    A missing min is 1 and a missing opt is the max; None when no max was given.
    """
    if name not in max_shapes:
        return None
    high = max_shapes[name][axis]
    low = min_shapes[name][axis] if name in min_shapes else 1
    best = opt_shapes[name][axis] if name in opt_shapes else high
    if not 1 <= low <= best <= high:
        raise InputError(
            f"input {name!r} dim {axis}: need 1 <= min <= opt <= max, got {low}/{best}/{high}"
        )
    return low, best, high
