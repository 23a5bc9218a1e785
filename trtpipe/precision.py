"""Precision lives in the ONNX graph (TensorRT 11 is strongly typed only).

- fp16: ModelOpt AutoCast, which keeps overflow-prone ops (LayerNorm, Softmax, Pow, reductions)
  in FP32, checked against real tokenized reference inputs (not random int64 ids).
- int8 for TensorRT: explicit symmetric Q/DQ via ModelOpt ``quantize`` with calibration data.
- int8 for ONNX Runtime on CPU (measured in docs/precision.md, reproduced by
  scripts/int8_sweep.py): transformer fusion, then dynamic quantization of MatMul and Attention
  with per-channel weights, keeping in fp32 the nodes whose quantization hurts the model's
  outputs on the calibration text most (``trtpipe.int8_selection``, greedy end to end; a
  cheaper local proxy is selectable). SmoothQuant-style smoothing is available (``alpha``) but
  off by default.
- fp32 for ONNX Runtime: transformer fusion only (results within a few 1e-6 of the export).
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.cpu_features import SATURATING_FAMILIES
from trtpipe.errors import BuildError, InputError
from trtpipe.int8_proxy import KEEP_FP32_FRACTION, SMOOTH_ALPHA, weighted_nodes

log = logging.getLogger(__name__)

# How the nodes kept in fp32 are chosen: "greedy" by their effect on the outputs, "proxy" by
# each node's local INT8 error (seconds instead of ~20 s on MiniLM).
INT8_SELECTIONS = ("greedy", "proxy")
# Greedy selection stops once the worst calibration row reaches this cosine...
INT8_TARGET_COSINE = 0.996
# ...or this share of the quantizable nodes is kept in fp32 (9 of 24 on MiniLM). The built-in
# calibration sentences are short and everyday, easier than most text: 0.996 on them came out at
# 0.992 on harder held-out text (0.995 and 8 nodes: 0.990), at about 5% less speed.
INT8_BUDGET_FRACTION = 0.375
# Weight types of ONNX Runtime's dynamic int8 (activations are uint8): "int8" runs the u8s8
# kernels, "uint8" the u8u8 ones (no int16 pair sums, so no saturation on AVX2; slower).
WEIGHT_TYPES = ("int8", "uint8")
# The int8 recipe per CPU int8 kernel family (trtpipe.cpu_features); "default" for the rest.
# Where u8s8 products are summed in int16 pairs (AVX2, AVX-512BW without VNNI), they saturate:
# measured on an AVX2 CPU (docs/precision.md), the same greedy recipe with u8s8 reached min
# cosine 0.988 on held-out text, with 7-bit weights (reduce_range) 0.987, with uint8 weights
# (u8u8, exact int32 sums) 0.9925, the figure VNNI CPUs reach with u8s8.
INT8_RECIPES: dict[str, dict[str, Any]] = {
    "default": {"weight_type": "int8", "reduce_range": False, "target": INT8_TARGET_COSINE},
    **{
        family: {"weight_type": "uint8", "reduce_range": False, "target": INT8_TARGET_COSINE}
        for family in SATURATING_FAMILIES
    },
}


def default_calibration_texts() -> list[str]:
    """Built-in calibration sentences, disjoint from the built-in compare sentences."""
    data = resources.files("trtpipe").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    return [line.strip() for line in data.splitlines() if line.strip()]


@contextlib.contextmanager
def scratch_dir(parent: Path | None = None) -> Iterator[Path]:
    """A scratch dir, removed on exit, that also receives third-party temp files.

    Given ``parent`` (the build's atomic temp dir, which the CLI's signal handler removes before
    ``os._exit``), nothing the precision step writes can outlive an interrupted build: our own
    intermediates (fused graph, fully quantized graph, calibration arrays) and the temp files
    ONNX Runtime's quantizer and ModelOpt create through ``tempfile`` while it runs.
    """
    path = Path(tempfile.mkdtemp(prefix="precision-", dir=parent))
    previous = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(path, ignore_errors=True)


def apply_precision(
    src: Path,
    dst: Path,
    precision: str,
    backend: str,
    calibration: dict[str, np.ndarray] | None,
    int8_selection: str = "greedy",
    int8_target: float | None = None,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Write ``dst`` with ``precision`` applied to ``src``; return what was done.

    ``int8_selection`` and ``int8_target`` apply to the ONNX Runtime INT8 recipe only.
    Intermediate files go to a scratch dir inside ``work_dir`` (default: the system temp dir).
    """
    with scratch_dir(work_dir) as work:
        return _apply_precision(
            src, dst, precision, backend, calibration, int8_selection, int8_target, work
        )


def _apply_precision(
    src: Path,
    dst: Path,
    precision: str,
    backend: str,
    calibration: dict[str, np.ndarray] | None,
    int8_selection: str,
    int8_target: float | None,
    work: Path,
) -> dict[str, Any]:
    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"unknown precision {precision!r}; use fp32, fp16 or int8")
    if precision == "int8" and not calibration:
        raise InputError("--int8 needs calibration text (--calib FILE, one sentence a line)")
    if precision == "fp16":
        return to_fp16(src, dst, calibration, work)
    if backend == "tensorrt":
        if precision == "fp32":
            shutil.copyfile(src, dst)
            return {"method": "none"}
        assert calibration is not None
        return to_int8_qdq(src, dst, calibration)
    from trtpipe.build.onnxruntime import fuse_transformer

    if precision == "fp32":
        return {"method": "none", **fuse_transformer(src, dst)}
    assert calibration is not None
    fused = work / "fused.onnx"
    fusion = fuse_transformer(src, fused)
    recipe = int8_recipe()
    if int8_target is not None:
        recipe["target"] = int8_target
    return {
        **to_int8_dynamic(fused, dst, calibration, selection=int8_selection, work=work, **recipe),
        **fusion,
    }


def to_fp16(
    src: Path, dst: Path, calibration: dict[str, np.ndarray] | None, work: Path | None = None
) -> dict[str, Any]:
    """ModelOpt AutoCast with real reference inputs; I/O types kept so clients see no change."""
    from modelopt.onnx.autocast import convert_to_mixed_precision

    from trtpipe.onnx_files import uses_external_data

    file_backed = bool(calibration) and uses_external_data(src)
    with scratch_dir(work) as scratch:
        reference: dict[str, Any] = {}
        if file_backed:
            # AutoCast's own reference run holds several copies of the weights (see
            # trtpipe.fp16_ranges); the same check, reading them in place, replaces it.
            from trtpipe.fp16_ranges import range_rule

            assert calibration is not None
            reference = {"data_max": np.inf, "custom_rule": range_rule(src, calibration)}
        elif calibration:
            calib_path = str(scratch / "calib.npz")
            np.savez(calib_path, **calibration)  # type: ignore[arg-type]
            reference = {"calibration_data": calib_path}
        try:
            model = convert_to_mixed_precision(
                onnx_path=str(src), low_precision_type="fp16", keep_io_types=True, **reference
            )
        except Exception as exc:  # ModelOpt raises assorted types
            raise BuildError(f"FP16 conversion failed: {exc}") from exc
    from trtpipe.onnx_files import save_model

    # External weights beside dst when src had them or the model passes 2 GB.
    save_model(model, dst, external=uses_external_data(src) or None)
    del model
    return {
        "method": "modelopt.autocast",
        "keep_io_types": True,
        "calibration": "real text" if calibration else "random",
        "reference_run": "trtpipe.fp16_ranges" if file_backed else "autocast",
    }


def to_int8_qdq(src: Path, dst: Path, calibration: dict[str, np.ndarray]) -> dict[str, Any]:
    """Explicit Q/DQ (symmetric, per-channel weights) for TensorRT's strongly typed builder."""
    from modelopt.onnx.quantization import quantize

    from trtpipe.onnx_files import uses_external_data

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize(
                str(src),
                # ModelOpt also switches to external data by itself past 2 GB.
                use_external_data_format=uses_external_data(src),
                quantize_mode="int8",
                calibration_data=calibration,
                calibration_method="entropy",
                calibration_eps=["cpu"],
                high_precision_dtype="fp32",
                output_path=str(dst),
                log_level="WARNING",
            )
    except Exception as exc:
        raise BuildError(f"INT8 Q/DQ quantization failed: {exc}") from exc
    restore_io_dim_names(src, dst)
    return {"method": "modelopt.quantize", "calibration": "entropy", "qdq": True}


def restore_io_dim_names(src: Path, dst: Path) -> None:
    """Give the graph I/O of ``dst`` the dynamic dim names of ``src``.

    ModelOpt's quantize can rename a dynamic output dim to ``unk__N`` (seen on a pipeline
    stage's hidden-state output): the manifest would lose which axis is the batch and which the
    sequence. Only the graph proto is rewritten; external weights stay where they are.
    """
    import onnx

    source = onnx.load(str(src), load_external_data=False)
    names = {
        v.name: [d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in [*source.graph.input, *source.graph.output]
    }
    model = onnx.load(str(dst), load_external_data=False)
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        want = names.get(value.name)
        dims = value.type.tensor_type.shape.dim
        if want is None or len(want) != len(dims):
            continue
        for dim, name in zip(dims, want, strict=True):
            if name and not dim.HasField("dim_value") and dim.dim_param != name:
                dim.dim_param = name
                changed = True
    if changed:
        onnx.save(model, str(dst))


def int8_recipe(family: str | None = None) -> dict[str, Any]:
    """The ONNX Runtime CPU int8 options for an int8 kernel family (default: this machine's).

    See ``INT8_RECIPES``; the family goes into the build record.
    """
    from trtpipe.cpu_features import int8_kernel_family

    family = family or int8_kernel_family()
    return {"cpu_family": family, **INT8_RECIPES.get(family, INT8_RECIPES["default"])}


def to_int8_dynamic(
    src: Path,
    dst: Path,
    calibration: dict[str, np.ndarray],
    alpha: float = SMOOTH_ALPHA,
    keep_fraction: float = KEEP_FP32_FRACTION,
    keep_fp32: list[str] | None = None,
    selection: str = "greedy",
    target: float = INT8_TARGET_COSINE,
    budget_fraction: float = INT8_BUDGET_FRACTION,
    weight_type: str = "int8",
    reduce_range: bool = False,
    cpu_family: str | None = None,
    work: Path | None = None,
) -> dict[str, Any]:
    """Smoothed, per-channel dynamic INT8 of MatMul and Attention (the ONNX Runtime CPU path).

    ``keep_fp32`` names nodes left unquantized. By default they are chosen by ``selection``:
    "greedy" keeps nodes in fp32 by their measured effect on the outputs over the calibration
    text until the worst row reaches ``target`` cosine or ``budget_fraction`` of the nodes are
    kept (``trtpipe.int8_selection``); "proxy" keeps the ``keep_fraction`` of nodes with the
    largest local INT8 error (``most_sensitive``). ``weight_type`` ("int8" or "uint8") and
    ``reduce_range`` (7-bit weights) select ONNX Runtime's kernels; ``cpu_family`` is only
    recorded (the greedy selection measures this machine's kernels).
    """
    import onnx

    from trtpipe.int8_proxy import most_sensitive, smooth_activations

    if selection not in INT8_SELECTIONS:
        raise InputError(f"unknown INT8 selection {selection!r}; use one of {INT8_SELECTIONS}")
    if not 0 < target <= 1:
        raise InputError(f"INT8 target cosine {target} must be in (0, 1]")
    if weight_type not in WEIGHT_TYPES:
        raise InputError(f"unknown INT8 weight type {weight_type!r}; use one of {WEIGHT_TYPES}")
    quantizer: dict[str, Any] = {"weight_type": weight_type, "reduce_range": reduce_range}
    model = onnx.load(str(src))
    smoothed = smooth_activations(model, [calibration], alpha) if alpha > 0 else 0
    info: dict[str, Any] = {"selection": "given" if keep_fp32 is not None else selection}
    with scratch_dir(work) as scratch:
        # Quantize from src itself unless smoothing rewrote the graph.
        smooth_path = scratch / "smoothed.onnx" if smoothed else src
        if smoothed:
            onnx.save(model, str(smooth_path))
        if keep_fp32 is None and selection == "proxy":
            # Unsmoothed, the model is src's: captures run on src's file, weights read in place.
            source = None if smoothed else src
            keep_fp32 = most_sensitive(model, [calibration], keep_fraction, source=source)
        if keep_fp32 is None:
            try:
                keep_fp32, found = greedy_fp32_nodes(
                    model, smooth_path, scratch, calibration, target, budget_fraction, **quantizer
                )
                info.update(found)
            except BuildError:
                raise
            except Exception as exc:  # an unusual graph: fall back to the local proxy
                log.warning("end-to-end INT8 selection failed (%s); using the local proxy", exc)
                keep_fp32 = most_sensitive(model, [calibration], keep_fraction)
                info["selection"] = "proxy (greedy failed)"
        del model  # the quantizer loads its own copy: never two in memory (models over 2 GB)
        quantize_dynamic_int8(smooth_path, dst, keep_fp32, **quantizer)
    log.info("int8: %d nodes kept fp32: %s", len(keep_fp32), keep_fp32)
    return {
        "method": "onnxruntime.quantize_dynamic",
        "ops": ["MatMul", "Attention"],
        "per_channel": True,
        "weights": f"{weight_type} {'symmetric' if weight_type == 'int8' else 'asymmetric'}"
        + (", 7-bit range" if reduce_range else ""),
        "weight_type": weight_type,
        "reduce_range": reduce_range,
        "cpu_family": cpu_family,
        "activations": "uint8, per tensor, at run time",
        "smoothing_alpha": alpha,
        "smoothed_nodes": smoothed,
        "kept_fp32": keep_fp32,
        **info,
    }


def greedy_fp32_nodes(
    model: Any,
    path: Path,
    work: Path,
    calibration: dict[str, np.ndarray],
    target: float,
    budget_fraction: float,
    weight_type: str = "int8",
    reduce_range: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """Nodes to keep in fp32, by their effect on the outputs; and a record for the build log."""
    import onnx

    from trtpipe.int8_selection import select_fp32_nodes

    nodes = weighted_nodes(model)
    budget = int(budget_fraction * len(nodes))
    everything = work / "all_int8.onnx"
    quantize_dynamic_int8(path, everything, [], weight_type, reduce_range)
    chosen = select_fp32_nodes(
        model, onnx.load(str(everything)), nodes, calibration, target=target, budget=budget
    )
    mask = calibration.get("attention_mask")
    return chosen.kept_fp32, {
        "target_cosine": target,
        "budget": budget,
        "calibration_sentences": len(next(iter(calibration.values()))),
        "calibration_tokens": int(mask.sum()) if mask is not None else None,
        "calibration_cosine_min_all_int8": round(chosen.cosine_min_all_int8, 6),
        "calibration_cosine_min": round(chosen.cosine_min, 6),
        "calibration_cosine_tail": round(chosen.cosine_tail, 6),
        "selection_steps": chosen.steps,
        "selection_evaluations": chosen.evaluations,
        "selection_s": round(chosen.seconds, 2),
    }


def quantize_dynamic_int8(
    src: Path,
    dst: Path,
    keep_fp32: list[str],
    weight_type: str = "int8",
    reduce_range: bool = False,
) -> None:
    """ONNX Runtime dynamic INT8 of MatMul and Attention, per-channel weights."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from trtpipe.onnx_files import uses_external_data

    try:
        # Fused contrib ops defeat ONNX shape inference; their outputs are float.
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul", "Attention"],
            per_channel=True,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8,
            nodes_to_exclude=keep_fp32,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            # Weights beside dst as they were beside src (src is over 2 GB or came that way).
            use_external_data_format=uses_external_data(src),
        )
    except Exception as exc:
        raise BuildError(f"INT8 dynamic quantization failed: {exc}") from exc


def op_precision_counts(path: Path) -> dict[str, Any]:
    """Per-op-type and per-dtype node counts, for the build log."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    with contextlib.suppress(Exception):  # shape inference is best effort for the log
        model = onnx.shape_inference.infer_shapes(model)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    dtypes.update({v.name: v.type.tensor_type.elem_type for v in model.graph.output})
    from trtpipe.build.profile import ONNX_TO_NUMPY

    by_dtype: collections.Counter[str] = collections.Counter()
    by_op: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        by_op[node.op_type] += 1
        elem = dtypes.get(node.output[0]) if node.output else None
        by_dtype[ONNX_TO_NUMPY.get(elem or 0, "unknown")] += 1
    integer_ops = sum(
        n for op, n in by_op.items() if "Integer" in op or op.startswith(("Q", "DynamicQuantize"))
    )
    return {
        "nodes": len(model.graph.node),
        "by_output_dtype": dict(by_dtype),
        "by_op": dict(by_op),
        "integer_ops": integer_ops,
    }
