"""One model's ONNX Runtime CPU sessions, shared by the CPU workers of a device pool.

``InferenceSession.run`` is thread-safe and each calling thread runs its own launch, so N CPU
workers need one session, not N: the weights are held once (fp32 MiniLM, two workers on a
2-core VM, batches of 8: one one-thread session called from both ran 621 rows/s, two sessions
615). One-thread workers serve a loaded server best (no intra-op barriers to stall when the
front end takes a core) but leave a lone request on one core; so a second, wide session with
all the cores runs any launch that starts while no other worker is running. Served fp32
MiniLM, same run (docs/performance-log.md): one all-core worker c1 p50 3.8 ms, c64 325 req/s;
one-thread workers 5.4 ms, 348/s; shared one-thread workers with the wide session 3.9 ms, 357/s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

SessionMaker = Callable[[int | None], Any]  # intra-op threads -> a new session


class SharedSession:
    """The narrow session every worker runs on at once, and the wide one for a lone launch.

    ``wide_threads`` (None: no wide session) is used only where it is wider than the workers'
    own threads. The first worker to load creates the sessions; the last to close drops them.
    """

    def __init__(self, wide_threads: int | None = None) -> None:
        self.wide_threads = wide_threads
        self._lock = threading.Lock()
        self._narrow: Any = None
        self._wide: Any = None
        self._users = 0
        self._running = 0

    @property
    def users(self) -> int:
        """Workers holding the sessions (loaded and not closed)."""
        return self._users

    @property
    def sessions(self) -> list[Any]:
        """Every session a launch may run on (narrow first); empty when none is held."""
        return [s for s in (self._narrow, self._wide) if s is not None]

    def alone_threads(self, threads: int | None) -> int | None:
        """Intra-op threads of a launch that runs while no other worker runs."""
        return self.wide_threads if self._wide is not None else threads

    def acquire(self, make: SessionMaker, threads: int | None) -> Any:
        """The narrow session (``threads`` each), made with ``make`` if no worker holds it."""
        with self._lock:
            if self._narrow is None:
                narrow = make(threads)
                wide = None
                if self.wide_threads and self.wide_threads > (threads or self.wide_threads):
                    wide = make(self.wide_threads)
                self._narrow, self._wide = narrow, wide
            self._users += 1
            return self._narrow

    def release(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                self._narrow = self._wide = None

    @contextmanager
    def launch(self) -> Iterator[Any]:
        """The session for the launch starting now: wide when no other worker is running."""
        with self._lock:
            self._running += 1
            alone = self._running == 1 and self._wide is not None
            session = self._wide if alone else self._narrow
        try:
            yield session
        finally:
            with self._lock:
                self._running -= 1
