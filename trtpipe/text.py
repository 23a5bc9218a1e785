"""Texts -> engine feeds with the engine's own tokenizer; built-in sample texts."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from trtpipe.engine import TOKENIZER_FILES, TensorSpec
from trtpipe.errors import InputError


@functools.lru_cache(maxsize=8)
def load_tokenizer(directory: str) -> Any:
    """The fast tokenizer saved next to the ONNX file / in the engine dir."""
    from transformers import AutoTokenizer

    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"no tokenizer in {directory} (none of {', '.join(TOKENIZER_FILES)}); "
            "export the model with trtpipe export, which saves it next to model.onnx"
        )
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"no usable tokenizer in {directory}: {first}") from exc


def read_texts(path: str | Path) -> list[str]:
    """One text per line; blank lines skipped; a clear error for a missing or empty file.

    Pipes are read too: ``--texts <(head -n 100 corpus.txt)`` and ``--texts /dev/stdin``.
    """
    file = Path(path)
    if file.is_dir():
        raise InputError(f"{file} is a directory; give a text file with one text per line")
    if not file.exists():
        raise InputError(f"text file {file} does not exist")
    try:
        texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise InputError(f"{file} is not UTF-8 text") from exc
    except OSError as exc:  # unreadable: permissions, a socket
        raise InputError(f"cannot read text file {file}: {exc.strerror or exc}") from exc
    texts = [t for t in texts if t]
    if not texts:
        raise InputError(f"{file} holds no text (one text per line expected)")
    return texts


def sample_texts() -> list[str]:
    """A few dozen real English sentences shipped with trtpipe (calibration and compare)."""
    data = resources.files("trtpipe").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in data.splitlines() if line.strip()]


def encode(
    tokenizer: Any,
    texts: list[str],
    inputs: list[TensorSpec],
    max_length: int,
    pad_to_multiple_of: int | None = None,
    padding: str | bool = True,
) -> dict[str, np.ndarray]:
    """Tokenize into exactly the engine's inputs, with the engine's dtypes."""
    encoded = tokenizer(
        texts,
        padding=padding,
        truncation=True,
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="np",
    )
    return feeds_from_encoding(encoded, inputs)


def feeds_from_encoding(
    encoded: Mapping[str, Any], inputs: list[TensorSpec]
) -> dict[str, np.ndarray]:
    """Tokenizer output -> exactly the engine's inputs and dtypes (zero type ids if absent)."""
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name in encoded:
            feeds[spec.name] = np.asarray(encoded[spec.name], dtype=spec.dtype)
        elif spec.name == "token_type_ids":
            feeds[spec.name] = np.zeros(np.shape(encoded["input_ids"]), dtype=spec.dtype)
        else:
            raise InputError(f"the tokenizer does not produce input {spec.name!r}")
    return feeds
