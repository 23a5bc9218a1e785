"""One place that decides what an exception means on the wire (HTTP status, gRPC code).

User mistakes are 400 / INVALID_ARGUMENT with the message; overload is 503 / UNAVAILABLE; an
expired request is 504 / DEADLINE_EXCEEDED; a failing device is 500 / INTERNAL naming the
device. Anything unexpected is logged with its traceback here and answered with one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from trtpipe.errors import InputError, RunnerError, TrtpipeError

log = logging.getLogger(__name__)


class ModelNotFoundError(InputError):
    """Unknown model or version (HTTP 404, gRPC NOT_FOUND)."""


def unknown_generation_model(name: str, generation_models: list[str]) -> ModelNotFoundError:
    """A generate or completions request naming no generation model."""
    return ModelNotFoundError(
        f"unknown generation model {name!r}; models: {generation_models or 'none'}"
    )


class ModelNotReadyError(InputError):
    """The model has no healthy device (HTTP 503, gRPC UNAVAILABLE)."""


@dataclass(frozen=True)
class WireError:
    http_status: int
    grpc_code: str  # grpc.StatusCode member name
    message: str


def _runtime_errors() -> tuple[type[BaseException], type[BaseException]]:
    from trtpipe.runtime.batcher import QueueFullError, RequestTimeoutError

    return QueueFullError, RequestTimeoutError


def classify(exc: BaseException, log_unexpected: bool = True) -> WireError:
    queue_full, timed_out = _runtime_errors()
    message = str(exc) or type(exc).__name__
    if isinstance(exc, ModelNotFoundError):
        return WireError(404, "NOT_FOUND", message)
    if isinstance(exc, (ModelNotReadyError, queue_full)):
        return WireError(503, "UNAVAILABLE", message)
    if isinstance(exc, timed_out):
        return WireError(504, "DEADLINE_EXCEEDED", message)
    if isinstance(exc, RunnerError):
        return WireError(500, "INTERNAL", message)
    if isinstance(exc, InputError):
        return WireError(400, "INVALID_ARGUMENT", message)
    if isinstance(exc, TrtpipeError):
        return WireError(500, "INTERNAL", message)
    if log_unexpected:
        log.error("unexpected error while serving a request", exc_info=exc)
    return WireError(500, "INTERNAL", f"internal server error ({type(exc).__name__}: {exc})")
