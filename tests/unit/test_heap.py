"""The server's heap freeze: on only while a server that froze it runs."""

from __future__ import annotations

import gc

from trtpipe.server import heap


def test_refreeze_and_release_act_only_after_a_freeze() -> None:
    gc.unfreeze()
    try:
        heap.refreeze()  # no server froze the heap (ServerConfig.freeze_heap=False): no-op
        assert gc.get_freeze_count() == 0
        heap.freeze_loaded()
        frozen = gc.get_freeze_count()
        assert frozen > 0
        kept = [[]]  # a new object, then a refreeze (a model loaded) takes it in too
        kept[0].append(kept)
        heap.refreeze()
        assert gc.get_freeze_count() >= frozen
        heap.release()
        assert gc.get_freeze_count() == 0
        heap.refreeze()  # released: no-op again
        assert gc.get_freeze_count() == 0
    finally:
        heap.release()
        gc.unfreeze()
