"""Running the project's scripts/ as a user does: a fresh interpreter, output captured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python scripts/NAME ARGS...``; never raises on a non-zero exit (tests check it)."""
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
