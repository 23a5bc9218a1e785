"""JSON reports on disk: checked before the work starts, written atomically after it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trtpipe.errors import InputError


def check_writable(path: Path, option: str = "--json") -> None:
    """Fail before a long run, not after it, when ``path`` cannot take a file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{option} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise InputError(f"{option} {path}: cannot write in {parent}")
            break


def write_json(path: Path, data: Any) -> None:
    """Write atomically (parents created), so a failed run never leaves half a file."""
    path = Path(path)
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
