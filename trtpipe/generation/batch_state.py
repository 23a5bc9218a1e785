"""The running batch of one scheduler: rows of different lengths in one dense KV cache.

Layout: every cache tensor is ``[rows, heads, width, head_dim]`` and each row's tokens sit
right-aligned in it (left padding, attention mask 0 over the padding), so one decode step feeds
every row its pending token at column ``width`` with its own position id (its own length).
A finished row stays in place as a dead row (fed the pad token, output ignored) until the next
rebuild; a rebuild (on admission, or when half the rows are dead) copies the live rows and the
newly prefilled ones into a fresh cache whose width is the longest live row (the compaction).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from trtpipe.generation.sequence import Sequence


@dataclass(eq=False)
class Row:
    """One slot of the running batch."""

    seq: Sequence
    length: int  # tokens of this row held in the cache
    pending: int  # the last sampled token, fed by the next step
    live: bool = True


class RunningBatch:
    """Host-side bookkeeping of the rows in a decoder session's cache (see module docstring)."""

    def __init__(self, max_batch: int, max_total: int, pad_id: int):
        self.max_batch = max_batch
        self.max_total = max_total
        self.pad_id = pad_id
        self.rows: list[Row] = []
        self.width = 0

    @property
    def live(self) -> list[Row]:
        return [row for row in self.rows if row.live]

    @property
    def dead_count(self) -> int:
        return sum(1 for row in self.rows if not row.live)

    def fits(self, joining: Seq[Sequence]) -> bool:
        """Would every live row and ``joining`` (after their prefill) run to their end?

        Batch <= maximum, and the rebuilt width (longest row) plus the most tokens any row
        still needs stays within the engine's total length: admission never evicts.
        """
        live = self.live
        if len(live) + len(joining) > self.max_batch:
            return False
        width = max([r.length for r in live] + [len(s.prompt_ids) for s in joining], default=0)
        # A joining row's prefill produces its first token; the rest need one column each.
        need = max(
            [r.seq.remaining for r in live] + [s.params.max_new_tokens - 1 for s in joining],
            default=0,
        )
        # The last step's present holds width + need positions: at most max_total - 1, as in
        # the offline loop (prompt + max new tokens <= max_total).
        return width + need <= self.max_total - 1

    def step_feeds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids [B, 1], attention_mask [B, width + 1], position_ids [B, 1] for one step."""
        lengths = np.array([row.length for row in self.rows], dtype=np.int64)
        tokens = [row.pending if row.live else self.pad_id for row in self.rows]
        input_ids = np.array(tokens, dtype=np.int64)[:, None]
        columns = np.arange(self.width + 1, dtype=np.int64)[None, :]
        mask = (columns >= (self.width - lengths)[:, None]).astype(np.int64)
        return input_ids, mask, lengths[:, None].copy()

    def advance(self) -> None:
        """After a step: every row (dead ones too) holds one more token."""
        self.width += 1
        for row in self.rows:
            row.length += 1


def join_caches(
    old: Seq[np.ndarray] | None,
    keep: Seq[int],
    new: Seq[np.ndarray] | None,
    take: Seq[int],
    width: int,
) -> list[np.ndarray]:
    """Rows ``keep`` of ``old`` then rows ``take`` of ``new``, right-aligned in ``width`` columns.

    Every chosen row's tokens must fit in ``width`` (they are right-aligned in their source,
    so cutting leading columns drops padding only); missing columns on the left are zeros
    under a zero mask.
    """
    sources = [(old, keep), (new, take)]
    count = next(len(a) for a in (old, new) if a is not None)
    out: list[np.ndarray] = []
    for t in range(count):
        template = (old if old is not None else new)[t]  # type: ignore[index]
        batch = len(keep) + len(take)
        merged = np.zeros((batch, template.shape[1], width, template.shape[3]), template.dtype)
        start = 0
        for arrays, rows in sources:
            if arrays is None or not rows:
                continue
            source = arrays[t][np.asarray(rows)]
            cols = min(width, source.shape[2])
            if cols:
                merged[start : start + len(rows), :, width - cols :] = source[:, :, -cols:]
            start += len(rows)
        out.append(merged)
    return out
