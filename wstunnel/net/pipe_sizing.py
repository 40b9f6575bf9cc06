"""How many bytes an HTTP transport may hold past the multiplexer's fair order.

Why a module of its own: over a WebSocket the session's writer hands bytes to a
socket that takes only what the link is about to send (TCP_NOTSENT_LOWAT), so
an interactive channel's record queued after a bulk one waits for a few
milliseconds of bulk data at most. Over the HTTP transports the writer hands
them to a pipe (net/byte_pipe.py) drained by request and response bodies;
whatever sits in that pipe, or in the body being written, has left the fair
order: a keystroke queued after it waits for all of it to cross the link. With
a fixed 4 MiB that was 1-4 s on a 4 MB/s link (docs/PERFORMANCE.md).

``PipeSizer`` is the rule, kept pure (numbers in, a size out) so that it is
tested with numbers alone: each body write reports how many bytes it wrote
and how long the write took (the socket takes them only as fast as the link
sends, like the WebSocket's); the pipe may then hold about what the link
carries in ``PIPE_TIME_TARGET``, between ``MIN_PIPE_SIZE`` and
``MAX_PIPE_SIZE`` (loopback or a fast LAN keeps large writes: fewer system
calls, and the same throughput as before).

Where each body is a request of its own (a polling POST: its length is fixed
before it starts), the link idles for a round trip between two of them, so
small bodies would cost throughput on a long path. ``idle`` reports those
waits, and the target time becomes at least ``IDLE_FACTOR`` of them: the
bound then never costs more than about a tenth of the link's time, and a long
path keeps bodies as large as before. With two bodies in flight (a relay that
takes the next while one is arriving: docs/PROTOCOL.md §11.2), the next body
is on the link while the previous one's answer comes back: the link idles
only if a body takes less than that round trip to write, so
``PIPELINED_IDLE_FACTOR`` round trips are enough, and the bodies (what an
interactive record waits behind) are about a tenth as large.
"""

from __future__ import annotations

from typing import Final

__all__ = ["IDLE_FACTOR", "MAX_PIPE_SIZE", "MIN_PIPE_SIZE", "PIPELINED_IDLE_FACTOR",
           "PIPE_TIME_TARGET", "START_PIPE_SIZE", "PipeSizer"]

#: The bound's floor: small enough to wait 16 ms behind on a 4 MB/s link, large
#: enough that a body write is not a system call per record.
MIN_PIPE_SIZE: Final = 64 * 1024
#: The ceiling: what the pipe held before the bound adapted (4 MiB).
MAX_PIPE_SIZE: Final = 4 * 1024 * 1024
#: Where a new session starts: a slow link's first bulk burst waits behind this much.
START_PIPE_SIZE: Final = 256 * 1024
#: About how long the bytes held past the fair order take to cross the link.
PIPE_TIME_TARGET: Final = 0.025
#: The target time is at least this many of the recent idle waits between bodies:
#: the bound settles between half and all of the target's worth, so the link
#: idles at most 1 / (1 + IDLE_FACTOR / 2) of the time, under 10 %.
IDLE_FACTOR: Final = 20
#: The same with two bodies in flight: the bound settles between one and two round
#: trips' worth, so each body takes at least the round trip that the one before it
#: waits for its answer, and the link does not idle.
PIPELINED_IDLE_FACTOR: Final = 2
#: How many recent idle waits count (the least of them: a path's round trip,
#: not a moment the relay was slow to answer).
_IDLE_SAMPLES: Final = 8
#: Writes smaller than this say nothing about the link (an interactive record; a
#: small write that took long means this process was kept from running).
_TELLING_WRITE: Final = 16 * 1024


class PipeSizer:
    """The bound on an HTTP transport's pipe, from how fast its body writes drain.

    A write slower than the target shrinks the bound to what the link carried in
    the target time (never below the floor); a write of at least half the bound
    that took under half the target doubles it (up to the ceiling). In between
    it stays, so the bound settles between half and all of the target's worth.
    """

    def __init__(self, *, floor: int = MIN_PIPE_SIZE, ceiling: int = MAX_PIPE_SIZE,
                 start: int = START_PIPE_SIZE, target: float = PIPE_TIME_TARGET,
                 idle_factor: float = IDLE_FACTOR) -> None:
        if not 0 < floor <= start <= ceiling or target <= 0 or idle_factor < 0:
            raise ValueError("need 0 < floor <= start <= ceiling, target > 0 and "
                             "idle_factor >= 0")
        self.floor = floor
        self.ceiling = ceiling
        self.target = target
        self.idle_factor = idle_factor
        self.size = start
        self._idle: list[float] = []

    @property
    def time_target(self) -> float:
        """The time the bound's worth of bytes should take to cross the link."""
        return max(self.target, self.idle_factor * min(self._idle, default=0.0))

    def idle(self, elapsed: float) -> None:
        """The link waited ``elapsed`` s between the end of one body and the next (the
        answer's round trip): bodies must be long enough to make that small."""
        self._idle = [*self._idle[1 - _IDLE_SAMPLES:], elapsed]

    def wrote(self, size: int, elapsed: float) -> int:
        """A body write of ``size`` bytes took ``elapsed`` seconds; the new bound."""
        if size < _TELLING_WRITE:
            return self.size
        target = self.time_target
        if elapsed > target:
            carried = int(size * target / elapsed)
            self.size = max(self.floor, min(self.size, carried))
        elif elapsed < target / 2 and size * 2 >= self.size:
            self.size = min(self.ceiling, self.size * 2)
        return self.size
