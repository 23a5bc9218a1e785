"""Which engine dirs ``trtpipe serve`` serves, under which names.

Each positional path is an engine dir (it holds ``manifest.json``) or a model repository: a
dir whose sub-dirs are engine dirs, each served under its folder name (as Triton names models
after their folders). ``NAME=PATH`` renames the engine at PATH when a repository already holds
it, and adds it otherwise. A Triton repository (``model/config.pbtxt``, ``model/1/``) is
refused with a hint, since its models are not trtpipe engine dirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trtpipe.engine import MANIFEST_NAME
from trtpipe.errors import InputError


def triton_layout_error(path: Path) -> InputError | None:
    """An error when ``path`` looks like a Triton model (config.pbtxt or a numeric version dir)."""
    if (path / "config.pbtxt").is_file() or any(
        child.is_dir() and child.name.isdigit() for child in path.iterdir()
    ):
        return InputError(
            f"{path} is laid out as a Triton model (config.pbtxt / numbered version dirs); "
            "trtpipe serves engine dirs: build one per model with trtpipe build MODEL.onnx "
            f"-o REPOSITORY/{path.name} and serve REPOSITORY"
        )
    return None


def engine_dirs_in(path: Path) -> list[tuple[str, Path]]:
    """``path`` itself when it is an engine dir, else its sub-dirs that are (by folder name)."""
    if not path.exists():
        raise InputError(
            f"{path} is not an engine directory: it does not exist (give an engine dir or a dir "
            "of engine dirs)"
        )
    if not path.is_dir() or (path / MANIFEST_NAME).is_file() or (path / "model.onnx").is_file():
        # (an export dir: EngineDir says to build it first)
        return [(path.resolve().name, path)]
    found: list[tuple[str, Path]] = []
    for child in sorted(path.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue  # atomic builds leave .NAME.tmp-* dirs while they run
        if (child / MANIFEST_NAME).is_file():
            found.append((child.name, child))
            continue
        error = triton_layout_error(child)
        if error is not None:
            raise error
    if not found:
        error = triton_layout_error(path)
        raise error or InputError(
            f"{path} is neither an engine dir nor a dir of engine dirs (no {MANIFEST_NAME} in it "
            "or in its sub-dirs); build one with trtpipe build MODEL.onnx -o DIR"
        )
    return found


def resolve_model_dirs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """(name, engine dir) for every spec: ``DIR`` (engine dir or repository) or ``NAME=DIR``."""
    named: list[tuple[str, Path]] = []
    overrides: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep:
            if not name or "/" in name or not path:
                raise InputError(f"bad model spec {spec!r}: use ENGINE_DIR or NAME=ENGINE_DIR")
            overrides.append((name, Path(path)))
        elif not spec:
            raise InputError("an empty ENGINE_DIR was given")
        else:
            named.extend(engine_dirs_in(Path(spec)))
    discovered = {index: path.resolve() for index, (_, path) in enumerate(named)}
    for name, engine_path in overrides:
        # Renames an engine a positional DIR brought in (once); otherwise adds one more model
        # (the same engine dir may be served under several names).
        target = engine_path.resolve()
        match = next((i for i, path in discovered.items() if path == target), None)
        if match is None:
            named.append((name, engine_path))
        else:
            named[match] = (name, named[match][1])
            del discovered[match]
    names = [n for n, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(
            f"model name(s) {duplicates} given twice; name them with --name NAME=ENGINE_DIR"
        )
    return named
