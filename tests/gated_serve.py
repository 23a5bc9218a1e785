"""``trtpipe serve`` with a gate: a test double for the drain tests, run as ``python -m``.

Every batch the ONNX Runtime runner executes first takes one byte from the FIFO named by
``TRTPIPE_TEST_GATE``, so a test holds batches running (and the requests behind them queued)
for as long as it likes, without sleeps, while the real CLI, signal handler and drain run.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def install_gate(path: str) -> None:
    from trtpipe.runners.onnxruntime import OnnxRuntimeRunner

    # O_RDWR: opening does not wait for a writer, and reads block (no EOF) until a byte comes.
    gate = os.open(path, os.O_RDWR)
    real = OnnxRuntimeRunner._infer

    def gated_infer(self: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        os.read(gate, 1)
        return real(self, feeds)

    OnnxRuntimeRunner._infer = gated_infer  # type: ignore[method-assign]


if __name__ == "__main__":
    install_gate(os.environ["TRTPIPE_TEST_GATE"])
    from trtpipe.cli.main import cli

    cli()
