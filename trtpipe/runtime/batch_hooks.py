"""How a launch is put together from requests and taken apart again.

The dynamic batcher's loop decides only which requests go together and when; what a launch
looks like is the served model's business, passed in as hooks (as LitServe keeps its serving
loop apart from the user's batch/unbatch hooks). The default pads every sequence axis the
engine's specs name and cuts each request's own rows back out.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from trtpipe.runtime.padding import Layout, pad_and_stack, split_outputs

Feeds = dict[str, np.ndarray]


class BatchHooks(Protocol):
    def prepare(self, parts: list[tuple[Feeds, int]], padded: int) -> Feeds:
        """One launch from ``(feeds, rows)`` parts, sequence axes padded to ``padded``."""
        ...

    def split(self, outputs: Feeds, parts: list[tuple[int, int]], padded: int) -> list[Feeds]:
        """Each ``(rows, seq_len)`` part's own outputs from the launch's outputs."""
        ...


class PaddingHooks:
    """Pad with per-input pad values (the tokenizer's pad id for ``input_ids``), split back."""

    def __init__(self, layout: Layout, pad_ids: dict[str, int], right: bool = True):
        self.layout = layout
        self.pad_ids = pad_ids
        self.right = right

    def prepare(self, parts: list[tuple[Feeds, int]], padded: int) -> Feeds:
        return pad_and_stack(self.layout, parts, padded, self.pad_ids, self.right)

    def split(self, outputs: Feeds, parts: list[tuple[int, int]], padded: int) -> list[Feeds]:
        return split_outputs(self.layout, outputs, parts, padded, self.right)
