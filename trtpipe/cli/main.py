"""``trtpipe`` entry point: a click group that imports each subcommand only when used."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from typing import Any

import click

from trtpipe import __version__
from trtpipe.errors import TrtpipeError

SUBCOMMANDS = {
    "export": ("trtpipe.cli.export", "Export a Hugging Face model to ONNX (optimum)."),
    "build": (
        "trtpipe.cli.build",
        "Build an engine dir (fp32/fp16/int8; TensorRT or ONNX Runtime).",
    ),
    "compare": ("trtpipe.cli.compare", "Accuracy gate: engine vs the PyTorch model."),
    "inspect": ("trtpipe.cli.inspect", "Show an engine dir's manifest and build summary."),
    "bench": ("trtpipe.cli.bench", "Throughput/latency vs PyTorch; scaling; online load."),
    "serve": (
        "trtpipe.cli.serve",
        "Serve engine dirs over KServe v2 HTTP/gRPC (Triton-compatible).",
    ),
    "generate": ("trtpipe.cli.generate", "Generate text with a decoder engine (KV cache)."),
}


class LazyGroup(click.Group):
    """Lists subcommands without importing them, so ``--help`` stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module = importlib.import_module(SUBCOMMANDS[name][0])
        command: click.Command = module.command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, help_text) in SUBCOMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        previous = _exit_cleanly_on_signals()
        try:
            return super().invoke(ctx)
        except TrtpipeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _on_signal(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM (``kill``, a CI timeout): remove half-written outputs and exit.

    Raising KeyboardInterrupt instead can land inside an import or a C++ callback, where it
    turns into an abort or an unrelated ImportError and the temp dir stays behind.
    """
    from trtpipe.engine import remove_partial_dirs

    remove_partial_dirs()
    click.echo("interrupted", err=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(128 + signum)


def _exit_cleanly_on_signals() -> dict[int, Any]:
    """Install ``_on_signal`` for SIGINT and SIGTERM; ``serve`` puts its draining handlers over
    these while it serves. Returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        previous[signum] = signal.SIG_DFL if handler is None else handler
        signal.signal(signum, _on_signal)
    return previous


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trtpipe")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """trtpipe: Hugging Face model -> ONNX -> FP16/INT8 -> engine -> accuracy gate -> serve."""
    from trtpipe.cli.logs import configure_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_logging(verbose)


if __name__ == "__main__":
    cli()
