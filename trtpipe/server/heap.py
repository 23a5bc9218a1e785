"""Keep the garbage collector's full passes off what the server loaded at startup.

A served model brings torch, transformers, tokenizers and ONNX Runtime with it: about 470,000
objects the cyclic collector tracks. Each full (generation 2) pass walks all of them with the
event loop stopped: 143 ms a pass in the server, five passes over 180,000 requests of the
front-end ceiling (int8 MiniLM, 2-core CPU). ``gc.freeze()`` once the models are loaded moves
them out of the collector's sight, as the gc docs suggest for long-lived startup state; full
passes then take about half a millisecond. Frozen objects are still freed by reference
counting, but a cycle among them never would be, so whatever may become garbage (a model
unloaded or reloaded, the server stopping) is unfrozen first. The freeze is process-wide, so a
program that embeds the server can leave it off (``ServerConfig.freeze_heap``).
"""

from __future__ import annotations

import gc

_frozen = False  # whether a running server froze the heap


def freeze_loaded() -> None:
    """Collect what is already garbage, then freeze every object that survives."""
    global _frozen
    gc.collect()
    gc.freeze()
    _frozen = True


def refreeze() -> None:
    """After a model was loaded, unloaded or reloaded: collect the cycles it left among frozen
    objects, then freeze again (one full pass, the pause freezing otherwise saves)."""
    if _frozen:
        gc.unfreeze()
        freeze_loaded()


def release() -> None:
    """The server is stopping: hand its objects back to the collector."""
    global _frozen
    if _frozen:
        gc.unfreeze()
        _frozen = False
