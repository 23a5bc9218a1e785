"""The accuracy gate's verdict as the benchmarks quote it: passed, failed or unchecked, and how
that is known (a saved ``compare --json`` report, or the gate run now).

Kept apart from ``bench`` and ``compare`` so that neither imports the other: the benchmarks ask
here, and this module asks the comparisons.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from trtpipe.devices import Device
from trtpipe.engine import EngineDir
from trtpipe.errors import InputError

log = logging.getLogger(__name__)


def gate_status(
    engine: EngineDir, gate_report: Path | None = None, run_gate: bool = False
) -> dict[str, Any]:
    """Whether the engine passed the accuracy gate, and how that is known.

    Only engines whose gate passed may be quoted as the best engine.
    """
    if gate_report is not None:
        if not gate_report.is_file():
            raise InputError(f"--gate-report {gate_report} does not exist (write it with compare)")
        try:
            data = json.loads(gate_report.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"--gate-report {gate_report} is not JSON: {exc}") from exc
        if "passed" not in data:
            raise InputError(f"--gate-report {gate_report} is not a compare --json report")
        if data.get("precision") not in (None, engine.manifest.precision):
            raise InputError(
                f"--gate-report {gate_report} is for a {data['precision']} engine, "
                f"but {engine.path} is {engine.manifest.precision}"
            )
        status = "passed" if data["passed"] else "failed"
        return {"status": status, "source": str(gate_report), "report": data}
    if run_gate:
        from trtpipe.compare import Tolerances, compare_engine

        log.info("running the accuracy gate on %s", engine.path)
        report = compare_engine(engine, Tolerances.for_precision(engine.manifest.precision))
        status = "passed" if report.passed else "failed"
        return {
            "status": status,
            "source": "compare (built-in sentences)",
            "report": report.to_dict(),
        }
    return {"status": "unchecked", "source": "use --gate or --gate-report to check it"}


def decoder_gate_status(
    engine_dir: Path | str,
    run_gate: bool,
    gate_report: Path | None = None,
    device: Device | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """``bench --generate --gate``: the decoder gate's verdict in bench's gate format.

    ``--gate-report`` (a saved ``compare --json``) is read instead of running the gate.
    """
    from trtpipe.compare_decoder import compare_decoder_engine
    from trtpipe.generation.kv_cache import is_decoder

    engine = EngineDir(engine_dir)
    if not is_decoder(engine.manifest.inputs):
        raise InputError(
            f"{engine.path} is a {engine.manifest.task} engine; --generate needs a "
            "text-generation engine (export a decoder model)"
        )
    if gate_report is not None or not run_gate:
        return gate_status(engine, gate_report, False)
    log.info("running the decoder accuracy gate on %s", engine.path)
    report = compare_decoder_engine(engine, reference=reference, device=device)
    return {
        "status": "passed" if report.passed else "failed",
        "source": "compare (built-in sentences, teacher-forced)",
        "report": report.to_dict(),
    }
