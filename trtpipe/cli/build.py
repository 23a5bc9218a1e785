"""``trtpipe build MODEL.onnx [--fp16|--int8 --calib FILE] -o ENGINE_DIR``."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from trtpipe.errors import InputError
from trtpipe.export import BUILD_TASKS


@click.command("build")
@click.argument("onnx_path", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--fp16", is_flag=True, help="FP16 via ModelOpt AutoCast.")
@click.option(
    "--int8", is_flag=True, help="INT8 (Q/DQ for TensorRT; dynamic int8 on ONNX Runtime)."
)
@click.option("--fp32", is_flag=True, help="FP32 (the default).")
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help="Calibration texts, one a line (--fp16 reference inputs, --int8 calibration).",
)
@click.option(
    "--int8-select",
    "int8_selection",
    type=click.Choice(["greedy", "proxy"]),
    default=None,
    help="ONNX Runtime INT8: keep in fp32 the nodes that hurt the outputs most (greedy, "
    "measured end to end) or those with the largest local INT8 error (proxy, faster build) "
    "[default: greedy].",
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
    type=click.Choice(BUILD_TASKS),
    help="Override the detected task (export info, else config.json, else tensor: an ONNX "
    "file that is not a Hugging Face export, served as plain tensors).",
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
@click.option(
    "--pipeline-stages",
    type=click.IntRange(1),
    default=None,
    help="Cut the model at transformer-block boundaries into N stage engines (one per "
    "device), balanced by weight bytes.",
)
@click.option(
    "--stage-layers",
    default=None,
    help="Blocks per stage instead of balancing, e.g. 0-2,3-5 (implies --pipeline-stages).",
)
def command(
    onnx_path: Path,
    output: Path,
    fp16: bool,
    int8: bool,
    fp32: bool,
    calib: Path | None,
    int8_selection: str | None,
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
    pipeline_stages: int | None,
    stage_layers: str | None,
) -> None:
    """Build an engine directory from ONNX_PATH (an ``export`` output)."""
    from trtpipe.build import BuildConfig, build_engine_dir, resolve_backend
    from trtpipe.build.profile import parse_shapes
    from trtpipe.cli.logs import quiet_modelopt
    from trtpipe.cli.paths import check_output_dir, check_output_file
    from trtpipe.devices import Device, parse_device, require_visible
    from trtpipe.text import read_texts

    precision = _precision(fp16=fp16, int8=int8, fp32=fp32)
    _check_precision_options(precision, calib, int8_selection, int8_target)
    chosen = resolve_backend(backend)
    _check_tensorrt_options(chosen, backend)
    target = (
        parse_device(device)
        if device
        else (Device("cuda", 0) if chosen == "tensorrt" else Device("cpu"))
    )
    if device:
        require_visible(target)
    check_output_dir(output)
    if timing_cache is not None and chosen == "tensorrt":
        check_output_file(timing_cache, "--timing-cache")  # updated after the build
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
        int8_selection=int8_selection or "greedy",
        int8_target=int8_target,
        pipeline_stages=pipeline_stages or 0,
        stage_layers=stage_layers,
    )
    click.echo(f"building {precision} engine for {chosen} ...", err=True)
    if precision == "fp16" or (precision == "int8" and chosen == "tensorrt"):
        quiet_modelopt()  # the precision step runs ModelOpt
    engine = build_engine_dir(config)
    click.echo(f"wrote {engine.path} ({engine.manifest.backend}, {engine.manifest.precision})")


def _precision(**flags: bool) -> str:
    """One of --fp32/--fp16/--int8 (fp32 when none): two would silently build only the last."""
    given = [name for name, on in flags.items() if on]
    if len(given) > 1:
        named = " and ".join(f"--{name}" for name in given)
        raise InputError(f"{named} both given: choose one precision per engine dir")
    return given[0] if given else "fp32"


def _check_precision_options(
    precision: str, calib: Path | None, selection: str | None, target: float | None
) -> None:
    """Options that only the other precisions read are a mistake, not something to ignore."""
    if calib is not None and precision == "fp32":
        raise InputError("--calib is for --fp16 or --int8 builds; fp32 needs no calibration")
    for option, value in (("--int8-select", selection), ("--int8-target", target)):
        if value is not None and precision != "int8":
            raise InputError(f"{option} applies to --int8 builds only (this is {precision})")


def _check_tensorrt_options(chosen: str, asked: str) -> None:
    """TensorRT-only options: an error with --backend onnxruntime, a note when auto chose it."""
    if chosen == "tensorrt":
        return
    ctx = click.get_current_context()
    given = [
        option
        for option, param in (
            ("--workspace-mb", "workspace_mb"),
            ("--opt-level", "optimization_level"),
            ("--timing-cache", "timing_cache"),
        )
        if ctx.get_parameter_source(param) is ParameterSource.COMMANDLINE
    ]
    if not given:
        return
    if asked == "onnxruntime":
        raise InputError(f"{', '.join(given)}: TensorRT options, but --backend is onnxruntime")
    click.echo(
        f"note: {', '.join(given)} ignored: no TensorRT here, building for onnxruntime", err=True
    )
