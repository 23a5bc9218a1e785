"""SharedSession: which session a launch gets, and who creates and drops them (no ONNX Runtime)."""

from __future__ import annotations

import threading

from trtpipe.runners.shared_session import SharedSession


def made(log: list[int | None]):
    def make(threads: int | None) -> str:
        log.append(threads)
        return f"session-{threads}"

    return make


def test_first_worker_makes_narrow_and_wide_the_rest_reuse_them() -> None:
    log: list[int | None] = []
    shared = SharedSession(wide_threads=4)
    assert shared.acquire(made(log), 1) == "session-1"
    assert shared.acquire(made(log), 1) == "session-1"
    assert log == [1, 4] and shared.users == 2
    assert shared.sessions == ["session-1", "session-4"]
    assert shared.alone_threads(1) == 4
    shared.release()
    assert shared.sessions and shared.users == 1
    shared.release()
    assert shared.sessions == [] and shared.users == 0
    assert shared.acquire(made(log), 1) == "session-1" and log == [1, 4, 1, 4]


def test_no_wide_session_when_it_is_not_wider() -> None:
    for wide, threads in ((None, 1), (2, 2), (4, None)):
        log: list[int | None] = []
        shared = SharedSession(wide_threads=wide)
        shared.acquire(made(log), threads)
        assert log == [threads] and shared.alone_threads(threads) == threads
        with shared.launch() as session:
            assert session == f"session-{threads}"


def test_a_launch_alone_gets_the_wide_session_others_the_narrow_one() -> None:
    shared = SharedSession(wide_threads=2)
    shared.acquire(made([]), 1)
    with shared.launch() as first:
        assert first == "session-2"
        with shared.launch() as second:
            assert second == "session-1"
        with shared.launch() as third:
            assert third == "session-1"
    with shared.launch() as later:
        assert later == "session-2"  # the count went back to zero


def test_concurrent_launches_never_both_get_the_wide_session() -> None:
    shared = SharedSession(wide_threads=2)
    shared.acquire(made([]), 1)
    inside = threading.Barrier(2)
    got: list[str] = []

    def launch() -> None:
        with shared.launch() as session:
            got.append(session)
            inside.wait(timeout=5)  # both launches are running at once here

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(got) == ["session-1", "session-2"]
