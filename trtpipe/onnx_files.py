"""ONNX files whose weights may live in external data (``model.onnx`` + ``model.onnx_data``).

A protobuf message cannot exceed 2 GB, so every model over that size keeps its weights in a
separate file that the graph refers to by a path relative to itself. Each step that writes a
graph (precision transforms, the ONNX Runtime build) keeps the weights external when the model
is large or came that way, writes them beside the graph (so a directory stays self-contained),
and removes them together with the graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Stay well below protobuf's 2 GiB limit: the graph itself adds to the initializers' bytes.
PROTOBUF_SAFE_BYTES = 2**31 - 64 * 2**20
# Tensors smaller than this stay inline (shape constants, scales): onnx's own default.
INLINE_BYTES = 1024


def data_file_name(model_path: Path) -> str:
    """``model.fp16.onnx`` -> ``model.fp16.onnx_data``, the name optimum's export uses too."""
    return f"{model_path.name}_data"


def external_data_files(model_path: Path) -> list[str]:
    """Relative paths of the external-data files ``model_path`` refers to (no weights read)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # not a readable ONNX file: whoever parses it reports that
        return []
    return referenced_files(model, _get_all_tensors(model))


def referenced_files(model: Any, tensors: Any = None) -> list[str]:
    """External-data locations referenced by ``model``'s tensors, in first-use order."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    files: list[str] = []
    for tensor in tensors if tensors is not None else _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and location not in files:
                files.append(location)
    return files


def uses_external_data(model_path: Path) -> bool:
    return bool(external_data_files(model_path))


def too_large_for_protobuf(model: Any) -> bool:
    """Whether ``model`` (weights loaded) cannot be serialized as one protobuf message."""
    try:
        size = model.ByteSize()
    except Exception:  # some protobuf builds refuse to size messages over 2 GB
        return True
    return size <= 0 or size > PROTOBUF_SAFE_BYTES


def save_model(model: Any, path: Path, external: bool | None = None) -> None:
    """Save ``model`` to ``path``; weights in ``<name>_data`` beside it when ``external``.

    ``external=None`` decides by size. Writing external data consumes the in-memory weights
    (onnx moves each tensor's bytes to the file), so no second copy of them is made; do not
    use ``model`` afterwards.
    """
    import onnx

    if external is None:
        external = too_large_for_protobuf(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_model(path)  # onnx appends to an existing data file
    if not external:
        onnx.save_model(model, str(path))
        return
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file_name(path),
        size_threshold=INLINE_BYTES,
        convert_attribute=False,
    )
    log.debug("saved %s with its weights in %s", path.name, data_file_name(path))


def remove_model(path: Path) -> None:
    """Delete ``path`` and the external-data files beside it that it refers to."""
    if not path.is_file():
        return
    for name in external_data_files(path):
        data = (path.parent / name).resolve()
        if data.parent == path.parent.resolve():  # never outside the model's own directory
            data.unlink(missing_ok=True)
    path.unlink()


def files_of(path: Path) -> list[Path]:
    """``path`` and the external-data files it refers to (those that exist)."""
    found = [path]
    for name in external_data_files(path):
        if (path.parent / name).is_file():
            found.append(path.parent / name)
    return found
