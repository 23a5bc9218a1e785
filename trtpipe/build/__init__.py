"""Typed ONNX -> engine directory, for TensorRT or ONNX Runtime, written atomically."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe import __version__
from trtpipe.build.profile import build_profile, leading_batch_dims, max_positions, onnx_io_specs
from trtpipe.devices import Device, cuda_device_count
from trtpipe.engine import (
    PRECISIONS,
    EngineDir,
    Manifest,
    ShapeRange,
    TensorSpec,
    atomic_directory,
    sha256_file,
    write_manifest,
)
from trtpipe.errors import BackendUnavailableError, InputError
from trtpipe.export import TENSOR_TASK, ExportInfo, detect_build_task

log = logging.getLogger(__name__)

# Files copied next to the engine so the runtime can tokenize without the source model.
SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "trtpipe_export.json",
)
BUILD_LOG = "build_log.json"


@dataclass
class BuildConfig:
    """Everything ``trtpipe build`` accepts."""

    onnx_path: Path
    output: Path
    precision: str = "fp32"
    backend: str = "auto"
    calib_texts: list[str] | None = None
    min_shapes: dict[str, list[int]] = field(default_factory=dict)
    opt_shapes: dict[str, list[int]] = field(default_factory=dict)
    max_shapes: dict[str, list[int]] = field(default_factory=dict)
    workspace_mb: int = 4096
    optimization_level: int = 3
    timing_cache: Path | None = None
    device: Device | None = None
    task: str | None = None
    # ONNX Runtime INT8: how the nodes kept in fp32 are chosen ("greedy" or "proxy") and the
    # calibration cosine greedy selection stops at (None: trtpipe.precision's default).
    int8_selection: str = "greedy"
    int8_target: float | None = None
    # Pipeline stages (trtpipe.build.stages): cut into this many stage engines (0: one engine),
    # by weight bytes or by the block ranges in ``stage_layers`` ("0-2,3-5").
    pipeline_stages: int = 0
    stage_layers: str | None = None
    # Calibration/reference feeds given ready-made (a pipeline stage's boundary activations),
    # used instead of tokenizing calib_texts.
    calibration_feeds: dict[str, np.ndarray] | None = None


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return cuda_device_count() > 0


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "tensorrt" if tensorrt_available() else "onnxruntime"
    if backend not in ("tensorrt", "onnxruntime"):
        raise InputError(f"unknown backend {backend!r}; use auto, tensorrt or onnxruntime")
    if backend == "tensorrt" and not tensorrt_available():
        raise BackendUnavailableError(
            "--backend tensorrt needs the tensorrt package and a CUDA GPU; "
            "use --backend onnxruntime here (pip install 'trtpipe[gpu]' on a GPU machine)"
        )
    return backend


def load_onnx(path: Path) -> Any:
    """Load and check an ONNX file; a clear error for a missing or corrupt one."""
    import onnx

    if path.is_dir():
        hint = (
            f"; did you mean {path / 'model.onnx'}?"
            if (path / "model.onnx").is_file()
            else " (an engine directory is built already)"
            if (path / "manifest.json").is_file()
            else ""
        )
        raise InputError(f"{path} is a directory; build takes the ONNX file from export{hint}")
    if not path.is_file():
        raise InputError(f"ONNX file {path} does not exist (run trtpipe export first)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path} is not a valid ONNX file: {str(exc).splitlines()[0]}") from exc
    if not model.graph.node:
        raise InputError(f"{path} has an empty graph; re-export the model")
    from trtpipe.onnx_files import referenced_files

    missing = [name for name in referenced_files(model) if not (path.parent / name).is_file()]
    if missing:
        raise InputError(
            f"{path.name} keeps its weights in {', '.join(missing)}, which is missing from "
            f"{path.parent}; copy the export dir whole (the .onnx_data file beside model.onnx)"
        )
    return model


def with_inferred_output_shapes(model: Any, outputs: list[TensorSpec]) -> list[TensorSpec]:
    """``outputs`` with the dims that ONNX shape inference can fix filled in.

    Exporters often declare an output's feature dim as a symbol (``sentence_embedding`` of
    MiniLM: ``[batch_size, Divsentence_embedding_dim_1]``) that inference resolves to 384; the
    manifest should advertise the real shape. Best effort: the specs as given if inference fails.
    """
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # inference is optional: an unusual or huge graph keeps its dims
        log.debug("output shape inference skipped: %s", exc)
        return outputs
    found = {o.name: list(o.type.tensor_type.shape.dim) for o in inferred.graph.output}
    refined = []
    for spec in outputs:
        known = found.get(spec.name, [])
        shape, dims = list(spec.shape), list(spec.dims)
        if len(known) == len(shape):
            for i, dim in enumerate(known):
                if shape[i] == -1 and dim.HasField("dim_value") and dim.dim_value > 0:
                    shape[i] = int(dim.dim_value)
                    if i < len(dims):
                        dims[i] = ""
        refined.append(TensorSpec(spec.name, spec.dtype, shape, dims))
    return refined


def with_typed_dtypes(specs: list[TensorSpec], typed_path: Path) -> list[TensorSpec]:
    """``specs`` with the dtypes of the typed (post-precision) graph's I/O of the same name.

    The engine is built from the typed graph, so its I/O dtypes are the contract: an fp16 graph
    that keeps fp16 KV-cache I/O must say float16 in the manifest, or runners and decoder
    sessions would feed it float32. Shapes stay as inferred on the source graph (contrib ops of
    the ONNX Runtime graphs defeat shape inference).
    """
    import onnx

    from trtpipe.build.profile import ONNX_TO_NUMPY

    typed = onnx.load(str(typed_path), load_external_data=False).graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*typed.input, *typed.output]}
    return [
        TensorSpec(s.name, ONNX_TO_NUMPY.get(dtypes.get(s.name, 0), s.dtype), s.shape, s.dims)
        for s in specs
    ]


def calibration_feeds(
    model_dir: Path, texts: list[str], inputs: list[TensorSpec], profile: dict[str, ShapeRange]
) -> dict[str, np.ndarray]:
    """Tokenize calibration/reference texts into the model's inputs, within the profile."""
    from trtpipe.text import encode, load_tokenizer

    if not texts:
        raise InputError("calibration text is empty (one sentence a line expected)")
    tokenizer = load_tokenizer(str(model_dir))
    max_len = min((r.max[1] for r in profile.values() if len(r.max) > 1), default=128)
    batch = min((r.max[0] for r in profile.values()), default=len(texts))
    from trtpipe.generation.kv_cache import is_decoder

    if is_decoder(inputs):
        from trtpipe.generation.prompts import decoder_feeds

        # Decoders: prefill feeds (empty past), the shapes generation starts with.
        return decoder_feeds(tokenizer, texts[:batch], inputs, max_length=min(max_len, 128))
    feeds = encode(tokenizer, texts[:batch], inputs, max_length=min(max_len, 128))
    if "input_ids" in feeds and feeds["input_ids"].shape[1] < 2:
        raise InputError("calibration text tokenizes to nothing usable")
    return feeds


def build_engine_dir(config: BuildConfig) -> EngineDir:
    """Apply precision, build for the backend, write the engine dir atomically."""
    from trtpipe.precision import apply_precision, op_precision_counts

    if config.precision not in PRECISIONS:
        raise InputError(f"unknown precision {config.precision!r}; use one of {PRECISIONS}")
    if config.pipeline_stages or config.stage_layers:
        from trtpipe.build.staged_build import build_staged_engine_dir

        return build_staged_engine_dir(config)  # type: ignore[no-any-return]
    model = load_onnx(config.onnx_path)
    model_dir = config.onnx_path.parent
    info = ExportInfo.read(model_dir)
    task = config.task or (info.task if info else detect_build_task(model_dir))
    backend = resolve_backend(config.backend)
    inputs, outputs = onnx_io_specs(model)
    if task == TENSOR_TASK:
        inputs, outputs = leading_batch_dims(inputs), leading_batch_dims(outputs)
    outputs = with_inferred_output_shapes(model, outputs)
    profile = build_profile(
        inputs, config.min_shapes, config.opt_shapes, config.max_shapes, max_positions(model_dir)
    )
    calibration = config.calibration_feeds if config.precision != "fp32" else None
    if (
        calibration is None
        and config.precision != "fp32"
        and any(s.name == "input_ids" for s in inputs)
    ):
        from trtpipe.precision import default_calibration_texts

        texts = (
            config.calib_texts if config.calib_texts is not None else default_calibration_texts()
        )
        calibration = calibration_feeds(model_dir, texts, inputs, profile)

    timings: dict[str, float] = {}
    with atomic_directory(config.output, replaces="manifest.json") as tmp:
        for name in SIDE_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        typed = tmp / f"model.{config.precision}.onnx"
        start = time.perf_counter()
        int8_options: dict[str, Any] = {"int8_selection": config.int8_selection}
        if config.int8_target is not None:
            int8_options["int8_target"] = config.int8_target
        # The precision step's scratch files live inside tmp: an interrupted build (the CLI's
        # signal handler removes tmp) leaves nothing behind.
        precision_info = apply_precision(
            config.onnx_path,
            typed,
            config.precision,
            backend,
            calibration,
            work_dir=tmp,
            **int8_options,
        )
        timings["precision_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if backend == "tensorrt":
            from trtpipe.build.tensorrt import build_tensorrt

            engine_file, backend_info = build_tensorrt(typed, tmp, profile, config)
        else:
            from trtpipe.build.onnxruntime import build_onnxruntime

            engine_file, backend_info = build_onnxruntime(typed, tmp, config)
        timings["build_s"] = time.perf_counter() - start
        op_counts = op_precision_counts(typed)
        inputs = with_typed_dtypes(inputs, typed)
        outputs = with_typed_dtypes(outputs, typed)
        if engine_file != typed.name:
            from trtpipe.onnx_files import remove_model

            remove_model(typed)  # and its external weights: the engine file has its own
        manifest = Manifest(
            task=task,
            backend=backend,
            precision=config.precision,
            engine_file=engine_file,
            inputs=inputs,
            outputs=outputs,
            profile=profile,
            source_model=info.source_model
            if info
            else str(config.onnx_path.resolve())
            if task == TENSOR_TASK
            else "",
            library=info.library if info else "onnx" if task == TENSOR_TASK else "transformers",
            source_onnx_sha256=sha256_file(config.onnx_path),
            versions={**backend_info.pop("versions", {}), "trtpipe": __version__},
            device=backend_info.pop("device", {}),
            cpu_int8_family=precision_info.get("cpu_family") or ""
            if backend == "onnxruntime" and config.precision == "int8"
            else "",
            build_options={
                "precision": precision_info,
                "workspace_mb": config.workspace_mb,
                "optimization_level": config.optimization_level,
                **backend_info,
            },
        )
        write_manifest(tmp, manifest)
        (tmp / BUILD_LOG).write_text(
            json.dumps(
                {"timings": timings, "precision": precision_info, "op_counts": op_counts},
                indent=2,
            )
            + "\n"
        )
    log.info("wrote engine dir %s", config.output)
    return EngineDir(config.output)
