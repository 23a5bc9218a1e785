"""TensorRT engine build: typed ONNX -> ``engine.plan`` (TensorRT 10.12+ and 11.x).

The network is strongly typed: precision already lives in the ONNX graph (FP16 casts, INT8
Q/DQ), so no builder precision flags exist here, which is the only form TensorRT 11 accepts.
One optimization profile covers every input; the timing cache persists between builds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trtpipe.engine import ShapeRange
from trtpipe.errors import BackendUnavailableError, BuildError, InputError

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.plan"


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            "TensorRT is not installed; pip install 'trtpipe[gpu]' on a GPU machine "
            "or use --backend onnxruntime"
        ) from exc
    return trt


def capturing_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps errors so they can go into the raised message."""

    class CapturingLogger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CapturingLogger()


def parser_errors(parser: Any) -> list[str]:
    """Every ONNX parser error as ``node NAME (OP): description``."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node, op = error.node_name(), error.node_operator()
        where = f"node {node or '?'} ({op}): " if node or op else ""
        lines.append(f"{where}{error.desc()}")
    return lines


def read_timing_cache(path: Path | None) -> bytes:
    if path is None or not path.is_file():
        return b""
    return path.read_bytes()


def write_atomically(path: Path, data: Any) -> None:
    """Write ``data`` (bytes or a buffer) to ``path`` via a temp file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def external_data_files(model_path: Path) -> list[str]:
    """Relative paths of the external-data files ``model_path`` refers to (weights > 2 GB)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # not a readable ONNX file: the parser reports that, with its details
        return []
    files = []
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and location not in files:
                files.append(location)
    return files


@contextlib.contextmanager
def weights_beside(model_path: Path, source_dir: Path | None) -> Iterator[Path]:
    """A path to ``model_path`` with its external-data files beside it, as the parser needs.

    The TensorRT ONNX parser reads external weights relative to the model file's directory.
    If they are already there, that is the file itself; if the model file was copied without
    them (an fp32 build copies only the graph), a scratch dir with links to the graph and to the
    weights in ``source_dir`` (the export dir), so gigabytes are never copied: hard links where
    both are on one filesystem, symbolic links otherwise.
    """
    files = external_data_files(model_path)
    missing = [f for f in files if not (model_path.parent / f).is_file()]
    if not missing:
        yield model_path
        return
    found = [f for f in missing if source_dir is not None and (source_dir / f).is_file()]
    if len(found) != len(missing) or source_dir is None:
        lost = sorted(set(missing) - set(found))
        raise BuildError(
            f"{model_path.name} keeps its weights in external data {lost}, which is neither "
            f"beside it nor in {source_dir or 'the export dir'}; keep the .onnx_data files next "
            "to model.onnx"
        )
    with tempfile.TemporaryDirectory(prefix=".weights.", dir=model_path.parent) as scratch:
        scratch_dir = Path(scratch)
        linked = scratch_dir / model_path.name
        _link(model_path, linked)
        for name in files:
            origin = model_path.parent / name if name not in missing else source_dir / name
            target = scratch_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _link(origin, target)
        log.debug("parsing %s with external data from %s", model_path.name, source_dir)
        yield linked


def _link(origin: Path, target: Path) -> None:
    try:
        os.link(origin.resolve(), target)
    except OSError:  # another filesystem, or links not allowed: a symbolic link
        target.symlink_to(origin.resolve())


def build_tensorrt(
    typed_onnx: Path, out_dir: Path, profile: dict[str, ShapeRange], config: Any
) -> tuple[str, dict[str, Any]]:
    """Build ``out_dir/engine.plan``; return the engine file name and manifest details."""
    from trtpipe import cuda

    trt = import_tensorrt()
    device = config.device
    if device is not None and not device.is_gpu:
        raise InputError(f"TensorRT builds for a CUDA device, not {device}; use --device cuda:0")
    index = device.index if device is not None else 0
    cuda.set_device(index)
    capability = cuda.device_compute_capability(index)
    gpu_name = cuda.device_name(index)

    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    source = getattr(config, "onnx_path", None)
    with weights_beside(typed_onnx, Path(source).parent if source else None) as model_file:
        if not parser.parse_from_file(str(model_file)):
            details = "; ".join(parser_errors(parser)) or "no parser details"
            raise BuildError(f"TensorRT could not parse {typed_onnx.name}: {details}")

    build_config = builder.create_builder_config()
    build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    build_config.builder_optimization_level = config.optimization_level

    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape_range = profile.get(tensor.name)
        if shape_range is None:
            static = [int(d) for d in tensor.shape]
            if any(d < 0 for d in static):
                raise BuildError(f"input {tensor.name!r} is dynamic but has no profile range")
            shape_range = ShapeRange(static, static, static)
        try:  # the binding raises RuntimeError for a range it rejects
            opt_profile.set_shape(tensor.name, shape_range.min, shape_range.opt, shape_range.max)
        except RuntimeError as exc:
            raise BuildError(
                f"TensorRT rejected the shape range of input {tensor.name!r} (min "
                f"{shape_range.min}, opt {shape_range.opt}, max {shape_range.max}): {exc}; "
                "fix --min-shapes/--opt-shapes/--max-shapes"
            ) from exc
    if build_config.add_optimization_profile(opt_profile) < 0:
        raise BuildError(f"TensorRT rejected the optimization profile {profile}")

    cache_path: Path | None = config.timing_cache
    cache = build_config.create_timing_cache(read_timing_cache(cache_path))
    if cache is None or not build_config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning(
            "timing cache %s is unusable here (other GPU/version?); starting fresh", cache_path
        )
        cache = build_config.create_timing_cache(b"")
        build_config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("building TensorRT engine on %s (sm %s), this can take minutes", gpu_name, capability)
    # Only errors logged by the build itself explain its failure (not a stale timing cache's).
    first_build_error = len(logger.errors)
    plan = builder.build_serialized_network(network, build_config)
    if plan is None:
        details = "; ".join(logger.errors[first_build_error:][-5:]) or "see the TensorRT log"
        raise BuildError(
            f"TensorRT failed to build the engine: {details}. A larger --workspace-mb or a "
            "smaller --max-shapes may help"
        )
    write_atomically(out_dir / ENGINE_FILE, plan)
    if cache_path is not None:
        write_atomically(cache_path, build_config.get_timing_cache().serialize())
        log.info("timing cache written to %s", cache_path)
    return ENGINE_FILE, {
        "versions": {"tensorrt": str(trt.__version__)},
        "device": {"kind": "cuda", "name": gpu_name, "compute_capability": capability},
        "strongly_typed": True,
        "timing_cache": str(cache_path) if cache_path is not None else None,
    }
