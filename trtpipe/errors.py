"""One error base for user-facing failures; the CLI turns it into one line and exit code."""

from __future__ import annotations


class TrtpipeError(Exception):
    """A failure the user can fix; the message says how. Exit code 2 unless stated."""

    exit_code = 2


class InputError(TrtpipeError):
    """Bad input: missing files, bad options, shapes or dtypes outside what the engine allows."""


class EngineMismatchError(TrtpipeError):
    """An engine dir built for another backend, TensorRT version or GPU architecture."""


class BackendUnavailableError(TrtpipeError):
    """The requested backend or device is not present on this machine."""


class BuildError(TrtpipeError):
    """Export, precision transform or engine build failed."""


class AccuracyError(TrtpipeError):
    """The accuracy gate failed (the report lists every output)."""

    exit_code = 1


class RunnerError(TrtpipeError):
    """A runner failed while executing a batch."""
