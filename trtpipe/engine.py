"""The engine directory and its manifest: the contract between build, runtime and server.

An engine dir holds the engine file, ``manifest.json``, the tokenizer/config files and a build
log. The runtime and the server read only the manifest and the engine file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trtpipe.errors import EngineMismatchError, InputError

# Any one of these in a directory means a tokenizer was saved there.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model")

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")

# numpy dtype names used in manifests, mapped to KServe v2 datatype names.
NUMPY_TO_V2 = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
V2_TO_NUMPY = {v: k for k, v in NUMPY_TO_V2.items()}


@dataclass
class TensorSpec:
    """One input or output tensor: shape uses -1 for dynamic dims, ``dims`` names them."""

    name: str
    dtype: str
    shape: list[int]
    dims: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(
            name=data["name"],
            dtype=data["dtype"],
            shape=[int(d) for d in data["shape"]],
            dims=list(data.get("dims", [])),
        )


@dataclass
class ShapeRange:
    """Optimization profile entry for one input (TensorRT semantics; enforced on every backend)."""

    min: list[int]
    opt: list[int]
    max: list[int]

    def contains(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.min):
            return False
        return all(lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max, strict=True))


@dataclass
class Manifest:
    """What was built, from what, for which backend/device, and which shapes it accepts."""

    task: str
    backend: str
    precision: str
    engine_file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profile: dict[str, ShapeRange]
    source_model: str = ""
    library: str = "transformers"
    source_onnx_sha256: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)
    build_options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # int8 engines for ONNX Runtime: the int8 kernel family of the CPU they were built and
    # calibrated on (trtpipe.cpu_features); "" for every other engine and for 0.1.0 engine dirs.
    cpu_int8_family: str = ""
    # Pipeline-stage engines (trtpipe.build.stages): one entry per stage, in order, with its
    # dir ("stages/0"), block range, I/O names and weight bytes; empty for a single engine.
    stages: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def max_batch_size(self) -> int:
        """Largest batch any launch may take (first dim of the profile maximum)."""
        return min((r.max[0] for r in self.profile.values() if r.max), default=1)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise InputError(f"engine has no input {name!r}; inputs: {[s.name for s in self.inputs]}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            return cls(
                task=data["task"],
                backend=data["backend"],
                precision=data["precision"],
                engine_file=data["engine_file"],
                inputs=[TensorSpec.from_dict(t) for t in data["inputs"]],
                outputs=[TensorSpec.from_dict(t) for t in data["outputs"]],
                profile={k: ShapeRange(**v) for k, v in data["profile"].items()},
                source_model=data.get("source_model", ""),
                library=data.get("library", "transformers"),
                source_onnx_sha256=data.get("source_onnx_sha256", ""),
                versions=dict(data.get("versions", {})),
                device=dict(data.get("device", {})),
                build_options=dict(data.get("build_options", {})),
                extra=dict(data.get("extra", {})),
                cpu_int8_family=str(data.get("cpu_int8_family", "")),
                stages=[dict(stage) for stage in data.get("stages", [])],
                format_version=int(data.get("format_version", FORMAT_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"manifest is malformed ({exc!r}); rebuild the engine") from exc


class EngineDir:
    """An engine directory on disk, validated on open."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        onnx = self.path if self.path.suffix == ".onnx" else self.path / "model.onnx"
        if not manifest_path.is_file() and onnx.is_file():
            raise InputError(
                f"{self.path} is an exported model, not an engine directory; build one first: "
                f"trtpipe build {onnx} -o ENGINE_DIR"
            )
        if not self.path.is_dir():
            raise InputError(
                f"{self.path} is not an engine directory (build one with trtpipe build)"
            )
        if not manifest_path.is_file():
            raise InputError(f"{self.path} has no {MANIFEST_NAME}; is it an engine directory?")
        try:
            data = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{manifest_path} is not valid JSON: {exc}") from exc
        self.manifest = Manifest.from_dict(data)
        if self.manifest.format_version != FORMAT_VERSION:
            raise EngineMismatchError(
                f"{self.path} uses manifest format {self.manifest.format_version}, this trtpipe "
                f"reads {FORMAT_VERSION}; rebuild the engine"
            )
        if self.manifest.backend not in BACKENDS:
            raise EngineMismatchError(f"{self.path}: unknown backend {self.manifest.backend!r}")
        if self.manifest.stages:
            self.stage_dirs()  # each stage is a whole engine dir: open them to validate
        elif not self.engine_path.is_file():
            raise InputError(f"{self.path}: engine file {self.manifest.engine_file} is missing")

    def stage_dirs(self) -> list[EngineDir]:
        """The stage engine dirs of a pipeline-stage engine, in order (empty for others)."""
        stages = []
        for i, stage in enumerate(self.manifest.stages):
            path = self.path / str(stage.get("path", ""))
            if not (path / MANIFEST_NAME).is_file():
                raise InputError(f"{self.path}: stage {i} ({path.name}) is missing; rebuild it")
            stages.append(EngineDir(path))
        return stages

    @property
    def engine_path(self) -> Path:
        return self.path / self.manifest.engine_file

    @property
    def name(self) -> str:
        return self.path.name

    def has_tokenizer(self) -> bool:
        return any((self.path / f).is_file() for f in TOKENIZER_FILES)

    def expect_backend(self, backend: str) -> None:
        if self.manifest.backend != backend:
            raise EngineMismatchError(
                f"{self.path} was built for {self.manifest.backend}, not {backend}; "
                f"rebuild with --backend {backend}"
            )


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Temp dirs of atomic_directory blocks still running: what a signal handler must remove.
_PARTIAL_DIRS: set[Path] = set()


def remove_partial_dirs() -> None:
    """Delete every half-written output (for a process about to exit on a signal)."""
    for tmp in list(_PARTIAL_DIRS):
        shutil.rmtree(tmp, ignore_errors=True)
        _PARTIAL_DIRS.discard(tmp)


@contextlib.contextmanager
def atomic_directory(
    final: Path, overwrite: bool = True, replaces: str | None = None
) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; rename it into place only if the block succeeds.

    A failed build therefore leaves neither a half-written dir nor a damaged old one.
    ``replaces`` names the file that marks an existing ``final`` as an earlier output of the
    same kind: a non-empty dir without it is refused, so a mistyped ``-o`` (the export dir, the
    current dir, a home dir) never deletes the user's files.
    """
    given = Path(final)
    final = Path(os.path.abspath(given))  # "-o ." has no name to put a temp dir beside
    if final.exists() and not final.is_dir():
        raise InputError(f"output path {given} exists and is not a directory")
    if final.exists() and not overwrite:
        raise InputError(f"output directory {given} already exists")
    if (
        replaces is not None
        and final.is_dir()
        and any(final.iterdir())
        and not (final / replaces).is_file()
    ):
        raise InputError(
            f"output directory {given} already holds other files (no {replaces}); "
            "refusing to replace it: choose a new -o path"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    # Registered before it exists and until it is renamed into place, so a signal landing
    # between two of these lines still finds it (a SIGTERM right after mkdtemp used to leave it).
    # The pid keeps the name unique among processes, the random part within this one.
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    _PARTIAL_DIRS.add(tmp)
    try:
        tmp.mkdir(mode=0o700)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _PARTIAL_DIRS.discard(tmp)
        raise
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, backup)
    os.rename(tmp, final)
    _PARTIAL_DIRS.discard(tmp)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
