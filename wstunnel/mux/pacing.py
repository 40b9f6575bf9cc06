"""Rate limits, sans-IO: a token bucket, and a session's output pulled under one.

Theory of operation
-------------------
A :class:`TokenBucket` holds up to ``burst`` bytes of permission and gains
``rate`` bytes of it per second. It never reads a clock: the I/O layer calls
:meth:`TokenBucket.refill` with ``now`` (any monotonic clock, the same for
every session sharing the bucket). Spending may drive it below zero (a
*deficit*): a record is cut, or credit returned, whole, and the bytes it
overdrew are paid back before anything else may go. The long-run rate is
therefore exact, however the bytes were cut, and the scheduler never has to
cut a chunk to fit the bucket.

A :class:`Pacer` is one session's output under buckets shared with others:
the session's own pair (the relay: one pair per agent, shared by all its
sessions), and a pair per forward for the channels of that forward (the agent's
``forwards[].rate_limit``). Per direction:

* ``outbound`` (what this end sends): DATA is pulled only while the bucket is
  positive, each record at most the bucket's ``grain``: the scheduler sees what
  looks like a slow link and keeps choosing whose turn it is, so fairness
  between the session's channels is what it always is. A channel whose
  forward's bucket is empty loses its turn (it goes to the back) until it
  refills; the others are served as before. Control records (OPEN_OK, FIN,
  RESET, GOAWAY, pongs below us) never wait.
* ``inbound`` (what the peer sends): the peer may send only what we grant, so
  a WINDOW record is held back while a bucket it falls under is not positive,
  and each one released spends its increment. The peer's sender slows through
  flow control alone; our reader keeps reading (pongs, control records, DATA
  within credit already granted) and nothing on the wire changes
  (docs/PROTOCOL.md section 10.1). One channel's WINDOWs keep their order.

No limit, no pacer: ``TunnelProtocol`` pulls from the session directly, and
the only cost left is one test per write.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from ..errors import LocalProtocolError
from .scheduler import Parts
from .session import Session
from .wire import RecordType

__all__ = ["TokenBucket", "Pacer", "Limits", "MIN_BURST_SIZE", "BURST_INTERVAL", "default_burst"]

#: The smallest default burst: one full write of the I/O layer's first size.
MIN_BURST_SIZE: Final = 256 * 1024
#: The default burst is this many seconds at the rate (at least MIN_BURST_SIZE):
#: short enough that a limit holds within a few per cent over any second.
BURST_INTERVAL: Final = 0.1
#: A waiting writer wakes when the bucket holds this many seconds at the rate
#: (at least MIN_GRAIN_SIZE, at most MAX_GRAIN_SIZE and half the burst), and
#: a DATA record pulled under a limit is at most that large: about 100 wake-ups
#: a second per paced session, and the deficit after one record stays small.
GRAIN_INTERVAL: Final = 0.01
MIN_GRAIN_SIZE: Final = 16 * 1024
MAX_GRAIN_SIZE: Final = 1024 * 1024

_WINDOW: Final = int(RecordType.WINDOW)
_WINDOW_SIZE: Final = 9
_unpack_window: Final = struct.Struct("!II").unpack_from
_pack_window: Final = struct.Struct("!BII").pack


def default_burst(rate: float) -> int:
    """The burst a limit gets when its config names none."""
    return max(MIN_BURST_SIZE, int(rate * BURST_INTERVAL))


class TokenBucket:
    """Bytes that may go now: ``rate`` per second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "grain", "tokens", "updated", "throttled_time")

    def __init__(self, rate: float, burst: int | None = None, *, now: float = 0.0) -> None:
        """A full bucket.

        Args:
            rate: bytes per second (positive).
            burst: most bytes saved up while idle; default :func:`default_burst`.
            now: the clock's reading now (the I/O layer's clock).

        Raises:
            LocalProtocolError: ``rate`` or ``burst`` is not positive.
        """
        self.tokens = 0.0
        self.configure(rate, burst)
        self.tokens = float(self.burst)
        self.updated = now
        #: Seconds the bucket held less than ``grain``: traffic waited, or would have.
        self.throttled_time = 0.0

    def configure(self, rate: float, burst: int | None = None) -> None:
        """Change the limit (a reload); what is saved up is cut to the new burst."""
        if not rate > 0:
            raise LocalProtocolError(f"rate must be positive, got {rate}")
        if burst is None:
            burst = default_burst(rate)
        if burst <= 0:
            raise LocalProtocolError(f"burst must be positive, got {burst}")
        self.rate = float(rate)
        self.burst = burst
        grain = min(MAX_GRAIN_SIZE, max(MIN_GRAIN_SIZE, int(rate * GRAIN_INTERVAL)))
        self.grain = max(1, min(grain, burst // 2))
        self.tokens = min(self.tokens, float(burst))

    def refill(self, now: float) -> None:
        """Add what ``now - updated`` seconds earned (an earlier ``now`` is ignored)."""
        elapsed = now - self.updated
        if elapsed <= 0:
            return
        tokens = self.tokens
        if tokens < self.grain:
            self.throttled_time += min(elapsed, (self.grain - tokens) / self.rate)
        tokens += elapsed * self.rate
        self.tokens = tokens if tokens < self.burst else float(self.burst)
        self.updated = now

    def spend(self, size: int) -> None:
        """Take ``size`` bytes; the bucket may go below zero (a deficit to repay)."""
        self.tokens -= size

    @property
    def positive(self) -> bool:
        """Whether anything may go now (a deficit is repaid first)."""
        return self.tokens > 0

    def delay(self) -> float:
        """Seconds after the last ``refill`` until the bucket holds ``grain`` (0: now)."""
        missing = self.grain - self.tokens
        return missing / self.rate if missing > 0 else 0.0


#: A forward's (outbound, inbound) buckets; None: no limit that way.
Limits = tuple["TokenBucket | None", "TokenBucket | None"]
_NO_LIMITS: Final[Limits] = (None, None)


class Pacer:
    """One session's output under rate limits (the module docstring).

    ``TunnelProtocol`` pulls records with :meth:`next_parts` instead of the
    session's ``next_record_parts``; the I/O layer calls :meth:`refill` before
    it waits and sleeps at most :meth:`delay` seconds when a pull came back
    empty (nothing else wakes it for bytes the buckets hold back). Channels of
    a limited forward are named with :meth:`limit_channel` when they open.
    """

    __slots__ = ("outbound", "inbound", "forwards", "channels", "held", "_held_ids",
                 "_session")

    def __init__(self, session: Session, *, outbound: TokenBucket | None = None,
                 inbound: TokenBucket | None = None,
                 forwards: dict[str, Limits] | None = None) -> None:
        self._session = session
        self.outbound = outbound
        self.inbound = inbound
        #: Buckets by forward name, and by channel of those forwards.
        self.forwards = forwards or {}
        self.channels: dict[int, Limits] = {}
        #: Credit held back, in order: (channel, WINDOW increment, its buckets).
        self.held: deque[tuple[int, int, tuple[TokenBucket, ...]]] = deque()
        self._held_ids: dict[int, int] = {}  # channel -> WINDOWs of it held

    def limit_channel(self, channel_id: int, forward: str | None) -> None:
        """The channel belongs to ``forward``: its limits (if any) apply to it."""
        limits = self.forwards.get(forward) if forward is not None else None
        if limits is not None:
            self.channels[channel_id] = limits

    def forget_channel(self, channel_id: int) -> None:
        self.channels.pop(channel_id, None)

    def refill(self, now: float) -> None:
        for bucket in self._buckets():
            bucket.refill(now)

    def _buckets(self) -> set[TokenBucket]:
        pairs = [(self.outbound, self.inbound), *self.forwards.values()]
        return {bucket for pair in pairs for bucket in pair if bucket is not None}

    def next_parts(self, max_size: int | None = None) -> Parts | None:
        """The session's next record, as ``Session.next_record_parts``, within the limits."""
        record = self._next_control()
        if record is not None:
            return record, b""
        outbound = self.outbound
        limit = max_size
        if outbound is not None:
            if outbound.tokens <= 0:
                return None
            if limit is None or outbound.grain < limit:
                limit = outbound.grain
        forward = None
        if self.channels:
            found, forward = self._next_allowed()
            if not found:
                return None
            if forward is not None and (limit is None or forward.grain < limit):
                limit = forward.grain
        if outbound is None and forward is None:
            return self._session.next_record_parts(limit)
        parts = self._session.next_record_parts(limit)
        if parts is not None:
            size = len(parts[1])
            if outbound is not None:
                outbound.spend(size)
            if forward is not None:
                forward.spend(size)
        return parts

    def _next_allowed(self) -> tuple[bool, TokenBucket | None]:
        """Send channels whose forward's bucket is empty to the back of the round;
        (whether a channel may send now, its forward's outbound bucket)."""
        session = self._session
        channels = self.channels
        for _ in range(session.ready_count):
            head = session.ready_channel()
            bucket = None if head is None else channels.get(head, _NO_LIMITS)[0]
            if bucket is None or bucket.tokens > 0:
                return True, bucket
            session.skip_turn()
        return False, None

    def _next_control(self) -> bytes | None:
        """A control record; a WINDOW waits while a bucket it falls under is not positive."""
        if self.held:
            record = self._release_held()
            if record is not None:
                return record
        next_control = self._session.next_control_record
        inbound = self.inbound
        while True:
            record = next_control()
            if (record is None or len(record) != _WINDOW_SIZE or record[0] != _WINDOW
                    or (inbound is None and not self.channels)):
                return record
            channel_id, increment = _unpack_window(record, 1)
            limits = self.channels.get(channel_id, _NO_LIMITS)[1], inbound
            buckets = tuple(bucket for bucket in limits if bucket is not None)
            if channel_id in self._held_ids or not all(b.tokens > 0 for b in buckets):
                self._hold(len(self.held), channel_id, increment, buckets)
                continue
            return self._grant(len(self.held), channel_id, increment, buckets)

    def _hold(self, index: int, channel_id: int, increment: int,
              buckets: tuple[TokenBucket, ...]) -> None:
        self.held.insert(index, (channel_id, increment, buckets))
        self._held_ids[channel_id] = self._held_ids.get(channel_id, 0) + 1

    def _grant(self, index: int, channel_id: int, increment: int,
               buckets: tuple[TokenBucket, ...]) -> bytes:
        """A WINDOW of at most one grain of ``increment``, spent from ``buckets``; the
        rest stays held at ``index`` (a big increment, from a window that grew, would
        let a burst of its size through at once)."""
        part = increment
        if buckets:
            part = min(increment, min(bucket.grain for bucket in buckets))
            if part < increment:
                self._hold(index, channel_id, increment - part, buckets)
            for bucket in buckets:
                bucket.spend(part)
        return _pack_window(_WINDOW, channel_id, part)

    def _release_held(self) -> bytes | None:
        """Credit for the first held WINDOW whose buckets are all positive (a channel's
        first held one comes before its later ones: they share their buckets)."""
        if self._session.failure is not None:
            self.held.clear()  # (a failed session sends its GOAWAY and nothing else)
            self._held_ids.clear()
            return None
        for index, (channel_id, increment, buckets) in enumerate(self.held):
            if all(bucket.tokens > 0 for bucket in buckets):
                del self.held[index]
                left = self._held_ids.pop(channel_id) - 1
                if left:
                    self._held_ids[channel_id] = left
                return self._grant(index, channel_id, increment, buckets)
        return None

    def delay(self) -> float | None:
        """Seconds until held-back output may go, or None when nothing is held back
        (after a pull came back empty; the buckets refilled)."""
        delays = [max(bucket.delay() for bucket in buckets) for _, _, buckets in self.held]
        session = self._session
        if session.ready_count and (self.outbound is not None or self.channels):
            wait = self.outbound.delay() if self.outbound is not None else 0.0
            channels = self.channels
            forwards = [channels.get(channel_id, _NO_LIMITS)[0]
                        for channel_id in session.ready_channel_ids()]
            wait = max(wait, min(0.0 if bucket is None else bucket.delay()
                                 for bucket in forwards))
            delays.append(wait)
        return min(delays) if delays else None
