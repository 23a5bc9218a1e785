"""``trtpipe build MODEL.onnx [--fp16|--int8 --calib FILE] -o ENGINE_DIR``."""

from __future__ import annotations

from pathlib import Path

import click

from trtpipe.export import TASKS


@click.command("build")
@click.argument("onnx_path", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--fp16", "precision", flag_value="fp16", help="FP16 via ModelOpt AutoCast.")
@click.option(
    "--int8",
    "precision",
    flag_value="int8",
    help="INT8 (Q/DQ for TensorRT; dynamic int8 on ONNX Runtime).",
)
@click.option("--fp32", "precision", flag_value="fp32", default=True, help="FP32 (default).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration texts, one a line.")
@click.option(
    "--int8-select",
    "int8_selection",
    type=click.Choice(["greedy", "proxy"]),
    default="greedy",
    show_default=True,
    help="ONNX Runtime INT8: keep in fp32 the nodes that hurt the outputs most (greedy, "
    "measured end to end) or those with the largest local INT8 error (proxy, faster build).",
)
@click.option(
    "--int8-target",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="ONNX Runtime INT8, greedy: stop keeping nodes in fp32 once the worst calibration "
    "row reaches this cosine [default: 0.996].",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "tensorrt", "onnxruntime"]),
    default="auto",
    show_default=True,
    help="auto = TensorRT when TensorRT and a GPU are present, else ONNX Runtime.",
)
@click.option("--device", default=None, help="Target device (cpu, cuda:0); default by backend.")
@click.option("--min-shapes", help="Profile minimum, e.g. input_ids:1x1 (name:BxS, comma list).")
@click.option("--opt-shapes", help="Profile optimum, e.g. input_ids:8x128.")
@click.option("--max-shapes", help="Profile maximum, e.g. input_ids:32x512.")
@click.option(
    "--task",
    type=click.Choice(TASKS),
    help="Model task, when the ONNX file has no export info or config.json beside it.",
)
@click.option("--workspace-mb", type=click.IntRange(1), default=4096, show_default=True)
@click.option(
    "--opt-level",
    "optimization_level",
    type=click.IntRange(0, 5),
    default=3,
    show_default=True,
    help="TensorRT builder optimization level.",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    help="TensorRT timing cache file (read if present, updated after the build).",
)
def command(
    onnx_path: Path,
    output: Path,
    precision: str,
    calib: Path | None,
    int8_selection: str,
    int8_target: float | None,
    backend: str,
    device: str | None,
    min_shapes: str | None,
    opt_shapes: str | None,
    max_shapes: str | None,
    task: str | None,
    workspace_mb: int,
    optimization_level: int,
    timing_cache: Path | None,
) -> None:
    """Build an engine directory from ONNX_PATH (an ``export`` output)."""
    from trtpipe.build import BuildConfig, build_engine_dir, resolve_backend
    from trtpipe.build.profile import parse_shapes
    from trtpipe.devices import Device, parse_device, require_visible
    from trtpipe.text import read_texts

    chosen = resolve_backend(backend)
    target = (
        parse_device(device)
        if device
        else (Device("cuda", 0) if chosen == "tensorrt" else Device("cpu"))
    )
    if device:
        require_visible(target)
    config = BuildConfig(
        onnx_path=onnx_path,
        output=output,
        precision=precision,
        backend=chosen,
        calib_texts=read_texts(calib) if calib else None,
        min_shapes=parse_shapes(min_shapes),
        opt_shapes=parse_shapes(opt_shapes),
        max_shapes=parse_shapes(max_shapes),
        workspace_mb=workspace_mb,
        optimization_level=optimization_level,
        timing_cache=timing_cache,
        device=target,
        task=task,
        int8_selection=int8_selection,
        int8_target=int8_target,
    )
    click.echo(f"building {precision} engine for {chosen} ...", err=True)
    engine = build_engine_dir(config)
    click.echo(f"wrote {engine.path} ({engine.manifest.backend}, {engine.manifest.precision})")
