"""Accuracy gate for plain-tensor engines (ONNX files that are not Hugging Face exports).

There is no PyTorch model and no tokenizer: the reference is the source ONNX file itself on
ONNX Runtime's CPU provider in fp32, fed the same inputs as the engine. Inputs are random
tensors whose shapes lie in the engine's profile (seeded, so a report can be reproduced), or
the user's own arrays from an ``.npz`` file (one array per input name, batch first). The
figures are the encoder gate's (trtpipe.compare), per output, rows along the batch dim.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.compare_report import CompareReport, Tolerances, compare_outputs
from trtpipe.engine import EngineDir, Manifest, TensorSpec, sha256_file
from trtpipe.errors import InputError

log = logging.getLogger(__name__)

# Integer inputs of a plain graph are often indices or flags: keep random ones small.
RANDOM_INT_HIGH = 8


def random_tensor_batches(
    manifest: Manifest, samples: int, batch_size: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``samples`` rows in batches, every dynamic dim drawn within the profile.

    Dims of one kind (batch, sequence, ...) share a size across inputs, as the engine requires.
    Floats are standard normal, integers in 0..RANDOM_INT_HIGH-1, bools fair coins.
    """
    if samples < 1 or batch_size < 1:
        raise InputError("--random and --batch-size must be >= 1 for a tensor engine")
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, samples, batch_size):
        rows = min(batch_size, samples - start)
        sizes: dict[str, int] = {"batch": rows}
        feeds = {}
        for spec in manifest.inputs:
            shape = _draw_shape(spec, manifest, sizes, rng)
            feeds[spec.name] = _random_values(spec.dtype, shape, rng)
        batches.append(feeds)
    return batches


def _draw_shape(
    spec: TensorSpec, manifest: Manifest, sizes: dict[str, int], rng: np.random.Generator
) -> tuple[int, ...]:
    shape_range = manifest.profile.get(spec.name)
    shape = []
    for axis, fixed in enumerate(spec.shape):
        if fixed >= 0:
            shape.append(fixed)
            continue
        if shape_range is None:
            raise InputError(f"input {spec.name!r} has a dynamic dim but no profile range")
        low, high = shape_range.min[axis], shape_range.max[axis]
        kind = spec.dims[axis] if axis < len(spec.dims) else ""
        key = kind if kind and kind != "other" else f"{spec.name}:{axis}"
        if key not in sizes:
            sizes[key] = int(rng.integers(low, high + 1))
        shape.append(min(max(sizes[key], low), high))
    return tuple(shape)


def _random_values(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    kind = np.dtype(dtype).kind
    if kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.integers(0, RANDOM_INT_HIGH, size=shape).astype(dtype)


def npz_batches(path: Path, manifest: Manifest, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The arrays of ``path`` (one per engine input, batch first) cut into batches."""
    if not path.is_file():
        raise InputError(f"--inputs {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"--inputs {path} is not a readable .npz file: {exc}") from exc
    names = [s.name for s in manifest.inputs]
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        raise InputError(
            f"--inputs {path}: the engine takes {names}; missing {missing}, unknown {extra}"
        )
    rows = {arrays[n].shape[0] if arrays[n].ndim else -1 for n in names}
    if len(rows) != 1 or -1 in rows:
        raise InputError(f"--inputs {path}: every array needs the same first (batch) dim")
    total = rows.pop()
    if total < 1:
        raise InputError(f"--inputs {path}: the arrays hold no rows")
    for spec in manifest.inputs:
        array = arrays[spec.name]
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(
                f"--inputs {path}: {spec.name!r} is {array.dtype}, the engine takes {spec.dtype}"
            )
        shape_range = manifest.profile.get(spec.name)
        if shape_range is not None and not shape_range.contains(
            (min(total, batch_size), *array.shape[1:])
        ):
            raise InputError(
                f"--inputs {path}: {spec.name!r} shape {list(array.shape)} is outside the "
                f"engine profile {shape_range.min}..{shape_range.max}"
            )
    return [
        {n: np.ascontiguousarray(arrays[n][i : i + batch_size]) for n in names}
        for i in range(0, total, batch_size)
    ]


class OnnxReference:
    """The source ONNX graph on ONNX Runtime's CPU provider, fp32, no offline fusion."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Basic optimizations only: the reference should be the graph as written.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise InputError(f"ONNX Runtime cannot load the reference {path}: {exc}") from exc
        self.outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.outputs, feeds)
        return dict(zip(self.outputs, values, strict=True))


def reference_onnx(engine: EngineDir, reference: str | None) -> Path:
    """The ONNX file to compare with: ``--reference`` or the manifest's source, checked."""
    manifest = engine.manifest
    path = Path(reference or manifest.source_model).expanduser()
    if not str(path) or not path.suffix == ".onnx" or not path.is_file():
        raise InputError(
            f"{engine.path} is a plain-tensor engine; its source ONNX "
            f"{str(path) or '(not recorded)'} is not here: pass --reference MODEL.onnx"
        )
    digest = manifest.source_onnx_sha256
    if not reference and digest and sha256_file(path) != digest:
        raise InputError(
            f"{path} changed since {engine.path} was built (sha256 differs); rebuild the "
            "engine or pass --reference with the file it was built from"
        )
    return path


def compare_tensor_engine(
    engine: EngineDir,
    tolerances: Tolerances,
    random_samples: int = 0,
    inputs_file: Path | None = None,
    reference: str | None = None,
    batch_size: int = 16,
    device: Any = None,
    seed: int = 0,
) -> CompareReport:
    """Engine vs its source ONNX on ONNX Runtime fp32, on random or given inputs."""
    from trtpipe.runners import runner_for

    manifest = engine.manifest
    batch_size = max(1, min(batch_size, manifest.max_batch_size))
    if inputs_file is not None:
        batches = npz_batches(inputs_file, manifest, batch_size)
        label = f"inputs from {inputs_file}"
    else:
        samples = random_samples or 64
        batches = random_tensor_batches(manifest, samples, batch_size, seed)
        label = f"random inputs in the profile (seed {seed})"
    source = reference_onnx(engine, reference)
    reference_runner = OnnxReference(source)
    engine_out, reference_out = [], []
    with runner_for(engine, device) as engine_runner:
        for feeds in batches:
            engine_out.append(engine_runner.infer(feeds))
            produced = reference_runner.infer(feeds)
            reference_out.append({name: produced[name] for name in engine_out[-1]})
    outputs = compare_outputs(
        engine_out, reference_out, [None] * len(batches), manifest.task, tolerances
    )
    samples_run = sum(next(iter(b.values())).shape[0] for b in batches)
    passed = all(not r.failures for r in outputs.values())
    log.info("compared %s with %s on %d rows", engine.path, source, samples_run)
    return CompareReport(passed, manifest.precision, outputs, tolerances, samples_run, label)
