"""Output paths checked before the long work starts, not after it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from trtpipe.errors import InputError


def check_output_dir(path: Path, option: str = "-o") -> None:
    """Fail now when ``path`` cannot become a directory: a file in the way, or a parent that
    cannot take new entries (read-only, ``/proc``, no permission).

    Outputs are written as a temp dir beside ``path`` and renamed into place, so the check makes
    (and removes) such a temp dir in the nearest existing parent: permission bits say nothing
    for root or for special file systems.
    """
    given = Path(path)
    final = Path(os.path.abspath(given))
    if final.exists() and not final.is_dir():
        raise InputError(f"{option} {given} exists and is not a directory")
    _probe_parent(given, final, option, directory=True)


def check_output_file(path: Path, option: str) -> None:
    """The same for a report file (``--json``, ``--plot``): written after a long run, so a
    directory in its place or a parent that cannot take files is said now."""
    given = Path(path)
    final = Path(os.path.abspath(given))
    if final.is_dir():
        raise InputError(f"{option} {given} is a directory; give a file name")
    _probe_parent(given, final, option, directory=False)


def _probe_parent(given: Path, final: Path, option: str, directory: bool) -> None:
    """Make and remove a temp entry in the nearest existing parent of ``final``."""
    for parent in final.parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise InputError(f"{option} {given}: {parent} is a file, not a directory")
        prefix = f".{final.name}.check-"
        try:
            if directory:
                os.rmdir(tempfile.mkdtemp(prefix=prefix, dir=parent))
            else:
                handle, probe = tempfile.mkstemp(prefix=prefix, dir=parent)
                os.close(handle)
                os.unlink(probe)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise InputError(f"{option} {given}: cannot write in {parent} ({reason})") from exc
        return
