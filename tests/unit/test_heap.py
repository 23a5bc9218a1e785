"""The server's heap freeze: on only while a server that froze it runs."""

from __future__ import annotations

import gc

from trtpipe.server import heap


def test_refreeze_and_release_act_only_after_a_freeze() -> None:
    heap.release()  # whatever froze before (a server of another test) lets go first
    gc.unfreeze()
    try:
        heap.refreeze()  # no server froze the heap (ServerConfig.freeze_heap=False): no-op
        assert gc.get_freeze_count() == 0
        heap.freeze_loaded()
        assert gc.get_freeze_count() > 0
        kept: list[object] = [[]]  # new after the freeze: the collector still sees it ...
        assert any(o is kept for o in gc.get_objects())
        heap.refreeze()  # ... until a refreeze (a model loaded) freezes it with the rest
        assert not any(o is kept for o in gc.get_objects())
        assert gc.get_freeze_count() > 0
        heap.release()
        assert gc.get_freeze_count() == 0
        heap.refreeze()  # released: no-op again
        assert gc.get_freeze_count() == 0
    finally:
        heap.release()
        gc.unfreeze()
