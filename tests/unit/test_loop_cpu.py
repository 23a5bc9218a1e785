"""The event loop thread's CPU seconds in /metrics: the watched thread's own, nothing else."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from trtpipe.server.metrics import LoopCpuCollector, render

pytestmark = pytest.mark.skipif(
    not hasattr(time, "pthread_getcpuclockid"), reason="no per-thread CPU clock here"
)


def burn(seconds: float) -> None:
    """Spin on this thread for ``seconds`` of its own CPU time."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


def test_nothing_is_reported_before_a_thread_is_watched() -> None:
    collector = LoopCpuCollector()
    assert collector.seconds() is None
    assert list(collector.collect()) == []


def test_the_watched_threads_cpu_is_counted() -> None:
    collector = LoopCpuCollector()
    collector.watch()
    before = collector.seconds()
    assert before is not None
    burn(0.1)
    after = collector.seconds()
    assert after is not None and 0.1 <= after - before < 1.0
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = render(registry).decode()
    assert "# TYPE trtpipe_event_loop_cpu_seconds counter" in text
    sample = "trtpipe_event_loop_cpu_seconds_total "
    line = next(x for x in text.splitlines() if x.startswith(sample))
    assert float(line[len(sample) :]) >= after


def test_another_threads_work_is_not_counted_and_an_ended_thread_reports_nothing() -> None:
    collector = LoopCpuCollector()
    watching, release = threading.Event(), threading.Event()

    def idle_loop() -> None:
        collector.watch()
        watching.set()
        release.wait(10)

    thread = threading.Thread(target=idle_loop)
    thread.start()
    assert watching.wait(10)
    before = collector.seconds()
    assert before is not None
    burn(0.2)  # on this thread, not the watched one
    after = collector.seconds()
    assert after is not None and after - before < 0.05
    release.set()
    thread.join()
    assert collector.seconds() is None
