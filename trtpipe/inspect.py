"""Human-readable summary of an engine dir."""

from __future__ import annotations

import json

from trtpipe.build import BUILD_LOG
from trtpipe.engine import EngineDir


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])


def int8_family_line(built_on: str) -> str:
    """The CPU int8 kernel family an int8 engine was built on, against this machine's."""
    from trtpipe.cpu_features import int8_kernel_family

    here = int8_kernel_family()
    if not built_on:
        return f"not recorded (built before trtpipe recorded it); this CPU: {here}"
    if built_on == here:
        return f"{built_on} (built on this kind of CPU)"
    return f"{built_on}; this CPU: {here}, accuracy unchecked here: run trtpipe compare"


def summarize(engine: EngineDir) -> str:
    m = engine.manifest
    if m.stages:
        return summarize_stages(engine)
    size_mb = engine.engine_path.stat().st_size / 1e6
    lines = [
        f"engine dir   {engine.path}",
        f"task         {m.task} ({m.library})",
        f"backend      {m.backend}   precision {m.precision}",
        f"engine file  {m.engine_file} ({size_mb:.1f} MB)",
        f"source       {m.source_model or '-'}",
        f"versions     {', '.join(f'{k} {v}' for k, v in sorted(m.versions.items()))}",
    ]
    if m.device:
        lines.append(f"device       {', '.join(f'{k}={v}' for k, v in m.device.items())}")
    if m.backend == "onnxruntime" and m.precision == "int8":
        lines.append(f"int8 kernels {int8_family_line(m.cpu_int8_family)}")
    lines.append("")
    rows = []
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for spec in specs:
            shape_range = m.profile.get(spec.name)
            rows.append(
                [
                    kind,
                    spec.name,
                    spec.dtype,
                    str(spec.shape),
                    str(shape_range.min) if shape_range else "",
                    str(shape_range.opt) if shape_range else "",
                    str(shape_range.max) if shape_range else "",
                ]
            )
    lines.append(table(rows, ["io", "name", "dtype", "shape", "min", "opt", "max"]))
    log_path = engine.path / BUILD_LOG
    if log_path.is_file():
        build_log = json.loads(log_path.read_text())
        counts = build_log.get("op_counts", {})
        lines.append("")
        by_dtype = ", ".join(
            f"{k} {v}" for k, v in sorted(counts.get("by_output_dtype", {}).items())
        )
        lines.append(f"nodes        {counts.get('nodes', '?')} (by output dtype: {by_dtype})")
        timings = build_log.get("timings", {})
        lines.append("build time   " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return "\n".join(lines)


def summarize_stages(engine: EngineDir) -> str:
    """A pipeline-stage engine: the chain's I/O, then one row per stage (blocks, bytes, I/O)."""
    m = engine.manifest
    rows = []
    for stage, stage_dir in zip(m.stages, engine.stage_dirs(), strict=True):
        first, last = stage.get("layers", ["?", "?"])
        size_mb = stage_dir.engine_path.stat().st_size / 1e6
        rows.append(
            [
                stage.get("path", ""),
                f"{first}-{last}",
                f"{stage.get('weight_bytes', 0) / 1e6:.1f} MB",
                f"{size_mb:.1f} MB",
                ", ".join(stage.get("inputs", [])),
                ", ".join(stage.get("outputs", [])),
            ]
        )
    io_rows = [
        [kind, spec.name, spec.dtype, str(spec.shape)]
        for kind, specs in (("input", m.inputs), ("output", m.outputs))
        for spec in specs
    ]
    return "\n".join(
        [
            f"engine dir   {engine.path}",
            f"task         {m.task} ({m.library})",
            f"backend      {m.backend}   precision {m.precision}",
            f"stages       {len(m.stages)} (one device each; a pipeline replica is "
            f"{len(m.stages)} devices)",
            f"source       {m.source_model or '-'}",
            "",
            table(rows, ["stage", "blocks", "weights", "engine file", "inputs", "outputs"]),
            "",
            table(io_rows, ["io", "name", "dtype", "shape"]),
        ]
    )
