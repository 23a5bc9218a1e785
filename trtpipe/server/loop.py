"""The server's event loop: uvloop where it is installed (Linux, macOS), asyncio's otherwise.

uvloop's libuv loop cuts the per-request cost of sockets, timers and futures; with httptools
(which uvicorn picks on its own when installed) it is the front end Triton-scale traffic wants.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
