"""``trtpipe export MODEL -o DIR``."""

from __future__ import annotations

from pathlib import Path

import click

from trtpipe.export import DEFAULT_MODEL, TASKS


@click.command("export")
@click.argument("model", default=DEFAULT_MODEL)
@click.option("-o", "--output", required=True, type=click.Path(), help="Output directory.")
@click.option(
    "--task",
    default="auto",
    type=click.Choice(["auto", *TASKS]),
    show_default=True,
    help="Model task; auto reads the architecture from config.json.",
)
@click.option("--opset", type=int, default=None, help="ONNX opset (>= 17; default: optimum's).")
def command(model: str, output: str, task: str, opset: int | None) -> None:
    """Export MODEL (hub id or local dir; default the embedded all-MiniLM-L6-v2) to ONNX."""
    from trtpipe.cli.paths import check_output_dir
    from trtpipe.export import export_model

    check_output_dir(Path(output))
    click.echo(f"exporting {model} ...", err=True)
    path = export_model(model, output, task=task, opset=opset)
    click.echo(f"wrote {path}")
