"""``trtpipe inspect ENGINE_DIR``: the manifest as readable tables."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("engine_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest JSON.")
def command(engine_dir: str, as_json: bool) -> None:
    """Print ENGINE_DIR's manifest and build summary."""
    from trtpipe.engine import EngineDir
    from trtpipe.inspect import summarize

    engine = EngineDir(engine_dir)
    if as_json:
        click.echo(json.dumps(engine.manifest.to_dict(), indent=2))
        return
    click.echo(summarize(engine))
