"""When the device pool reloads an unhealthy device: exponential backoff, and what not to retry.

A CUDA fault, a lost device or a crashed kernel is often transient: reloading the runner brings
the device back. A mistake the user must fix (wrong engine for this GPU, missing backend) fails
the same way every time, so the pool says so once and stops trying.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from trtpipe.errors import InputError, RunnerError, TrtpipeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Reload after ``initial_s``, then ``factor`` times longer each failure, at most ``max_s``.

    The delay goes back to ``initial_s`` only once the device has run a batch again, so a device
    that loads but fails every batch is not reloaded every ``initial_s`` seconds forever.
    """

    initial_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not self.initial_s > 0:
            raise InputError(f"reload backoff: initial delay {self.initial_s} s must be > 0")
        if self.max_s < self.initial_s:
            raise InputError(
                f"reload backoff: max delay {self.max_s} s is below the initial {self.initial_s} s"
            )
        if self.factor < 1:
            raise InputError(f"reload backoff: factor {self.factor} must be >= 1")

    def delay(self, failures: int) -> float:
        """Seconds to wait before the reload that follows ``failures`` failures in a row."""
        delay = self.initial_s
        for _ in range(max(0, failures - 1)):
            if self.factor == 1 or delay >= self.max_s:
                break
            delay *= self.factor
        return float(min(delay, self.max_s))


DEFAULT_BACKOFF = Backoff()


def is_user_error(exc: BaseException) -> bool:
    """A mistake the user fixes (options, engine dir), not a device that broke."""
    return isinstance(exc, TrtpipeError) and not isinstance(exc, RunnerError)


def describe(exc: BaseException) -> str:
    if isinstance(exc, TrtpipeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def log_reload_plan(device: object, exc: BaseException, delay: float | None, in_a_row: int) -> None:
    """Say what happens next to a device that failed: a reload in ``delay`` s, or none."""
    if is_user_error(exc):
        log.error(
            "%s will not be reloaded: %s is a configuration error, not a device fault; "
            "fix it and restart",
            device,
            type(exc).__name__,
        )
    elif delay is not None:
        log.warning("%s: reloading in %g s (%d failure(s) in a row)", device, delay, in_a_row)
