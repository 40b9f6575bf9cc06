"""How much the session's writer sends per write, and when a rate limit lets it.

Why a module of its own: the writer loop (net/carrier_io.py) is the hot path and
stays short; the sizing rule is a pure function with its own tests
(tests/integration/net/test_write_pacing.py), and the paced wait is the one
place the writer sleeps for the rate limits (docs/PROTOCOL.md section 10.1).

One write's worth adapts to the link (``next_write_size``): 1 MiB on loopback,
where large writes save system calls and Python's work per byte, down to one
chunk on a slow link, where a 1 MiB write would hold an interactive record back
for 400 ms at 20 Mbit/s.
"""

from __future__ import annotations

from typing import Final

import trio

from .. import mux
from ..protocol import TunnelProtocol

__all__ = ["MAX_WRITE_SIZE", "MIN_WRITE_SIZE", "START_WRITE_SIZE", "WRITE_TIME_TARGET",
           "next_write_size", "wait_paced"]

#: Bytes pulled from the scheduler per write: at most MAX_WRITE_SIZE (fewer
#: system calls on a fast link; 1 MiB, not 256 KiB, took a quarter off the CPU
#: per GiB: docs/PERFORMANCE.md), at least MIN_WRITE_SIZE; below the chunk
#: size the scheduler cuts chunks of the write size (1.6 ms at 20 Mbit/s).
MAX_WRITE_SIZE: Final = 1024 * 1024
MIN_WRITE_SIZE: Final = 4 * 1024
#: The first write's limit; fast full writes double it up to MAX_WRITE_SIZE.
#: Below it the link counts as slow (the writer waits for writability before it
#: chooses what to send). A session's first bulk write on a slow link thus holds
#: an interactive record back at most as long as 256 KiB takes, not 1 MiB.
START_WRITE_SIZE: Final = 256 * 1024
#: How long one write may hold the writer. A record that becomes ready while
#: a write is in progress (an interactive channel's chunk, a WINDOW) waits for
#: that write, so on a slow link the write size follows the link's rate.
WRITE_TIME_TARGET: Final = 0.002
#: Added to a paced writer's sleep, so that the bucket has surely refilled when
#: it wakes (no second wake-up for a rounding error's worth of bytes).
_PACE_SLACK: Final = 0.0005


def next_write_size(size: int, written: int, elapsed: float) -> int:
    """The next write's size limit, from how long ``written`` bytes took.

    A write slower than the target shrinks the limit to what the link moved
    in that time; a full write well within the target doubles it. Small
    writes say nothing about the link, so they change nothing: a write of
    less than ``MIN_WRITE_SIZE`` that took long means this process was kept
    from running (a busy machine), and shrinking on it would leave a fast
    link paying a wait for writability before every write, since only full
    writes grow the limit again.
    """
    if written < MIN_WRITE_SIZE:
        return size
    if elapsed > WRITE_TIME_TARGET:
        return max(MIN_WRITE_SIZE, min(size, int(written * WRITE_TIME_TARGET / elapsed)))
    if elapsed < WRITE_TIME_TARGET / 2 and written * 2 >= size:
        return min(MAX_WRITE_SIZE, size * 2)
    return size


async def wait_paced(protocol: TunnelProtocol, pacer: mux.Pacer, wake: trio.Event) -> None:
    """An idle writer's wait under ``protocol``'s rate limits (its ``pacer``): until
    ``wake`` (the writer's wake-up), or until the limits let held-back output go
    (docs/PROTOCOL.md section 10.1); the buckets are refilled after."""
    pacer.refill(trio.current_time())
    delay = protocol.paced_delay()
    if delay is None:
        await wake.wait()
    elif delay > 0:
        with trio.move_on_after(delay + _PACE_SLACK):
            await wake.wait()
    pacer.refill(trio.current_time())
