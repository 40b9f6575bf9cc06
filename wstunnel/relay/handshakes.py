"""Connections still in their handshake: at most ``limit``, and the oldest makes room.

Theory of operation
-------------------
A connection counts from the moment its task starts (TCP accepted) until a
login lets it in (``Pending.admit``): its TLS handshake, its upgrade or
HTTP-opening request, the token check, and a refusal's answer all happen while
it counts. Nobody who has not logged in holds anything else, so this bounds
what strangers can hold: descriptors, and the memory of their handshakes.

When a new connection finds ``limit`` of them, the **oldest** is closed (its
task's cancel scope is cancelled; ``Relay.handle_connection`` closes the
socket) and the new one takes its place. Why neither of the obvious caps:

* refusing the new connection would drop real agents in a reconnect storm,
  and leave the places to whoever holds them without finishing (slowloris);
* a cap per source address lets an attacker behind an agent's own NAT (or
  behind the same proxy) lock that agent out.

A real agent finishes its handshake in a few round trips; the connection
that has waited longest without finishing is the one holding its place, so
it is the one to drop. What this cannot stop is a flood fast enough to push
``limit`` new connections in within one agent's handshake time: that is a
bandwidth attack, which no bound on held connections answers.

The default ``limit`` is a quarter of the open-files limit (capped;
service/open_files.py), so connections in their handshake never take the
descriptors that admitted sessions and their channels need, and accept never
stalls (EMFILE) because of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import trio

from ..service.metrics import TunnelStats

__all__ = ["Pending", "PendingHandshakes"]

log = logging.getLogger("wstunnel.relay")

#: At most one line about closed handshakes per this many seconds (the rest are counted).
EVICTION_LOG_INTERVAL: Final = 10.0


class Pending:
    """One connection still in its handshake; its task runs inside ``scope``."""

    __slots__ = ("peer", "since", "scope", "evicted", "_queue")

    def __init__(self, peer: str, since: float, queue: dict[Pending, None]) -> None:
        self.peer, self.since = peer, since
        self.scope = trio.CancelScope()
        self.evicted = False
        self._queue = queue

    def admit(self) -> bool:
        """Its login let it in: it no longer counts and is never closed to make room.
        False if it was closed for room first (its task is being cancelled)."""
        if self.evicted:
            return False
        self._queue.pop(self, None)
        return True


class PendingHandshakes:
    """The relay's connections still in their handshake, oldest first."""

    def __init__(self, limit: int, stats: TunnelStats) -> None:
        self.limit = limit
        self._stats = stats
        self._queue: dict[Pending, None] = {}  # (insertion order: the oldest first)
        self._logged_at = -EVICTION_LOG_INTERVAL
        self._unlogged = 0

    def __len__(self) -> int:
        return len(self._queue)

    @contextmanager
    def enter(self, peer: str) -> Iterator[Pending]:
        """Count a new connection while the block runs (until ``Pending.admit``), making
        room first. A close to make room cancels the block: the block ends quietly and
        ``Pending.evicted`` says so."""
        while len(self._queue) >= self.limit:
            self._evict(next(iter(self._queue)))
        pending = Pending(peer, trio.current_time(), self._queue)
        self._queue[pending] = None
        try:
            with pending.scope:
                yield pending
        finally:
            self._queue.pop(pending, None)

    def _evict(self, oldest: Pending) -> None:
        del self._queue[oldest]
        oldest.evicted = True
        oldest.scope.cancel()
        self._stats.handshakes_evicted += 1
        self._unlogged += 1
        now = trio.current_time()
        if now >= self._logged_at + EVICTION_LOG_INTERVAL:
            self._log(oldest, now)

    def _log(self, oldest: Pending, now: float) -> None:
        more = (f" ({self._unlogged - 1} more since the last such line)"
                if self._unlogged > 1 else "")
        log.warning("%s: closed after %.1f s without finishing its handshake, to make room: "
                    "%d connections were in theirs (max_pending_handshakes)%s -- many clients "
                    "connecting at once, or someone holding connections open without logging "
                    "in; if real agents are among those closed, raise max_pending_handshakes",
                    oldest.peer, now - oldest.since, self.limit, more)
        self._logged_at = now
        self._unlogged = 0
