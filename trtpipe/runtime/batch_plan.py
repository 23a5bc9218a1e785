"""Which queued requests share the next launch: the oldest one and its nearest neighbours in length.

A launch pads every request to its longest one, so it costs rows x longest, and on a CPU an
encoder's time is about proportional to that (a batch-1 call of MiniLM costs a sentence what
sorted batches of 32 do). Power-of-two length groups let a 17-token sentence ride with a
32-token one: served, a quarter of the launched positions were padding against 1% offline.
So the batch is grown from the oldest request (which is always in it, so nothing waits behind
later arrivals for ever) by the queued request nearest in length, as long as padding stays
within ``max_padding_share`` of the launch: the same rule the offline real-text bench uses to
cut its sorted batches (``bench.text.plan_batches``), applied to what has arrived.

Within that cap, padding is worth taking only while it costs less than the launch overhead it
shares: given the overhead (learnt by ``launch_cost``), the batch stops growing where the next
request would raise its cost per real token. Served int8 MiniLM at 64 clients on a 2-core CPU:
launches of 5.3 instead of 7.4 requests, 3.5% padding instead of 8.5%, 4-7% more sentences/s.
"""

from __future__ import annotations

from collections.abc import Sequence

# Share of a launch's sequence positions that may be padding. On a CPU padding is pure waste
# (cost follows tokens); on a GPU a launch has a fixed cost, so bigger batches with more
# padding pay (the old power-of-two groups allowed up to half).
CPU_MAX_PADDING_SHARE = 0.1
GPU_MAX_PADDING_SHARE = 0.5


def padded_length(shortest: int, longest: int, multiple: int, limit: int | None) -> int:
    """What a launch is padded to: its one length, else its longest rounded up to ``multiple``
    (never past the engine's ``limit``)."""
    if shortest == longest:
        return longest
    padded = -(-longest // multiple) * multiple
    return max(min(padded, limit), longest) if limit is not None else padded


def nearest_lengths(
    lengths: Sequence[int],
    rows: Sequence[int],
    max_rows: int,
    max_padding_share: float,
    multiple: int = 1,
    limit: int | None = None,
    launch_overhead: float | None = None,
) -> list[int]:
    """Indices (in arrival order) of the requests for the next launch.

    ``lengths[i]``/``rows[i]`` describe the i-th queued request in arrival order; index 0 is the
    oldest and is always chosen. The batch grows one request at a time by whichever neighbour
    in length (the next shorter or the next longer one) leaves the least padding, while rows
    stay within ``max_rows`` and padding within ``max_padding_share`` of the launch (or, where
    rounding to ``multiple`` already pads the batch beyond that, does not grow its share).

    ``launch_overhead`` (the engine's fixed cost of a launch, in sequence positions; None: not
    known) also stops the growth once the next request would raise the launch's estimated
    cost per real token, ``(launch_overhead + positions) / real tokens``: a request is worth
    its padding while that padding costs less than the launch overhead it shares.
    """
    count = len(lengths)
    if count == 0:
        return []
    order = sorted(range(count), key=lambda i: (lengths[i], i))
    low = high = order.index(0)
    total_rows, real = rows[0], rows[0] * lengths[0]
    shortest = longest = lengths[0]
    share_now = 0.0
    chosen = [0]
    while True:
        # (padding share, arrival index, side, positions of the launch with it)
        best: tuple[float, int, int, int] | None = None
        for side, at in ((-1, low - 1), (1, high + 1)):
            if not 0 <= at < count or total_rows + rows[order[at]] > max_rows:
                continue
            index = order[at]
            padded = padded_length(
                min(shortest, lengths[index]), max(longest, lengths[index]), multiple, limit
            )
            positions = (total_rows + rows[index]) * padded  # 0: no sequence axis, no padding
            share = 1.0 - (real + rows[index] * lengths[index]) / positions if positions else 0.0
            if share <= max(max_padding_share, share_now) and (
                best is None or (share, index) < best[:2]
            ):
                best = (share, index, side, positions)
        if best is None:
            break
        share_now, index, side, grown = best
        if launch_overhead is not None and real > 0:
            now = padded_length(shortest, longest, multiple, limit) * total_rows
            if (launch_overhead + grown) * real > (launch_overhead + now) * (
                real + rows[index] * lengths[index]
            ):
                break
        low, high = (low - 1, high) if side < 0 else (low, high + 1)
        chosen.append(index)
        total_rows += rows[index]
        real += rows[index] * lengths[index]
        shortest, longest = min(shortest, lengths[index]), max(longest, lengths[index])
    return sorted(chosen)
