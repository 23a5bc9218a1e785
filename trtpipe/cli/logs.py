"""What the CLI prints beside its results: trtpipe's progress always, other libraries when asked.

Default: trtpipe's INFO lines; other libraries' log records only at ERROR; Python warnings
(TracerWarning, deprecations) hidden. ``-v``: trtpipe's DEBUG lines, other libraries' WARNINGs and
Python warnings. ``-vv``: everything at DEBUG. ``PYTHONWARNINGS`` / ``-W`` still win.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

FORMAT = "%(levelname)s %(name)s: %(message)s"
_third_party_level = logging.ERROR
# Loggers shown like trtpipe's own (their level decides): trtpipe, and what a command turns on.
_shown: set[str] = {"trtpipe"}


def third_party_level(verbose: int) -> int:
    if verbose >= 2:
        return logging.DEBUG
    return logging.WARNING if verbose else logging.ERROR


class _ByOrigin(logging.Filter):
    """trtpipe's records pass (their logger's level decides); others need ``level``.

    A handler filter, because libraries that set their own logger levels (ModelOpt sets INFO)
    still propagate every record to the root handler.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        name = record.name
        return any(name == shown or name.startswith(f"{shown}.") for shown in _shown)


def show_logger(name: str, level: int = logging.INFO) -> None:
    """Show another library's logger at ``level`` by default (``serve --access-log``)."""
    _shown.add(name)
    logging.getLogger(name).setLevel(level)


def configure_logging(verbose: int) -> None:
    """Set up stderr logging for one CLI run.

    Only a process without logging set up (the ``trtpipe`` command itself, not an embedding
    program or a test runner) gets the handler, the root level and the warnings filter.
    """
    global _third_party_level
    _third_party_level = third_party_level(verbose)
    logging.getLogger("trtpipe").setLevel(logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_ByOrigin(_third_party_level))
    root.addHandler(handler)
    root.setLevel(_third_party_level)
    # transformers and optimum read this when first imported (they log through their own handler).
    name = logging.getLevelName(_third_party_level).lower()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", name)
    if not sys.warnoptions:
        if verbose:
            logging.captureWarnings(True)
        else:
            warnings.simplefilter("ignore")


def quiet_modelopt() -> None:
    """Route ModelOpt's log records through trtpipe's handler only, at the third-party level.

    ModelOpt configures its loggers when imported: level INFO, its own stdout handler, and
    propagation to the root handler too, so every line came twice. The precision step imports it
    anyway; importing it here first lets its loggers be set once, before it logs anything.
    """
    try:
        import modelopt.onnx.autocast  # noqa: F401  (imports every AutoCast module: all configured)
    except ImportError:
        return
    for name in list(logging.root.manager.loggerDict):
        if name == "modelopt" or name.startswith("modelopt."):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.setLevel(_third_party_level)
