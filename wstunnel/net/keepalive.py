"""One timer task for the keepalive of many sessions.

Why: a relay with many idle agents used to run one sleeping keepalive task per
session, and each wake-up of a trio timer costs a cancel scope, a ``Cancelled``
raised and caught, and a scheduler round: 55-60 us on the test VM, as much as
the ping exchange it decides on. ``KeepaliveTimer`` keeps every session's next
check in one heap and wakes one task for all of them; a check may run up to its
``slack`` early, so the checks of sessions due within that window share one
wake-up (docs/PERFORMANCE.md, "One relay, many agents").

A check is a plain function called in the timer's task: it returns its next
deadline and slack, or None when it is done. ``SessionKeepalive`` is the
decision one session's check makes (ping, only acknowledge, or give up on a
silent peer), as pure code given the time; the session (net/transport.py) acts
on it.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any, Final, NoReturn

import trio

__all__ = ["KeepaliveTimer", "Scheduled", "Check", "Due", "SessionKeepalive", "KeepaliveAction",
           "KEEPALIVE_SLACK"]

log = logging.getLogger("wstunnel.session")

#: A check's next (deadline, slack), or None: no more checks.
Due = tuple[float, float] | None
#: Called with (now, deadline) when due: ``now`` may be up to the slack before
#: ``deadline``.
Check = Callable[[float, float], Due]
#: A keepalive check may run this share of ``ping_interval`` early, so that one
#: wake-up of a relay's shared timer serves every session due within that window;
#: the check then acts as at its deadline.
KEEPALIVE_SLACK: Final = 1 / 40


class Scheduled:
    """One registered check; cancelled entries stay in the heap until popped."""

    __slots__ = ("check", "cancelled")

    def __init__(self, check: Check) -> None:
        self.check = check
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class KeepaliveTimer:
    """Calls registered checks when due, from one task (``run``).

    A relay runs one for all its sessions; a transport with no shared timer runs
    a private one in its own nursery. ``running`` says whether ``run`` is
    serving (a session given a timer that nobody runs would never ping).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, float, int, Scheduled]] = []
        self._order = itertools.count()  # (ties: first scheduled, first called)
        self._wake = trio.Event()
        self._waiting_until = math.inf
        self.running = False

    def schedule(self, check: Check, deadline: float, slack: float = 0.0) -> Scheduled:
        """Call ``check`` at ``deadline`` (or up to ``slack`` before), then when it
        says; the returned entry's ``cancel()`` stops it."""
        entry = Scheduled(check)
        self._push(entry, deadline, slack)
        if deadline < self._waiting_until:  # (the task wakes at the earliest deadline)
            self._wake.set()
        return entry

    def _push(self, entry: Scheduled, deadline: float, slack: float) -> None:
        heapq.heappush(self._heap, (deadline, slack, next(self._order), entry))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Serve the checks until cancelled."""
        self.running = True
        task_status.started()
        try:
            while True:
                self._run_due(trio.current_time())
                self._drop_cancelled()
                self._wake = trio.Event()
                self._waiting_until = self._heap[0][0] if self._heap else math.inf
                with trio.move_on_at(self._waiting_until):
                    await self._wake.wait()
        finally:
            self.running = False
            self._waiting_until = math.inf

    def _run_due(self, now: float) -> None:
        """Call every check due by ``now`` plus its slack, earliest first."""
        heap = self._heap
        again: list[tuple[Scheduled, float, float]] = []  # (pushed after: one call a pass)
        while heap and heap[0][0] - heap[0][1] <= now:
            deadline, _, _, entry = heapq.heappop(heap)
            if entry.cancelled:
                continue
            try:
                due = entry.check(now, deadline)
            except Exception:  # (one session's bug must not stop every session's pings)
                log.exception("keepalive check failed; that session is no longer checked")
                continue
            if due is not None:
                again.append((entry, *due))
        for entry, deadline, slack in again:
            if not entry.cancelled:
                self._push(entry, deadline, slack)

    def _drop_cancelled(self) -> None:
        """Pop cancelled entries off the top, so the next wake-up is for a live one."""
        heap = self._heap
        while heap and heap[0][3].cancelled:
            heapq.heappop(heap)


class KeepaliveAction(enum.Enum):
    """What a session does after a check (``SessionKeepalive.check``)."""

    WAIT = enum.auto()  # not due yet: nothing
    ACK = enum.auto()  # due, and the peer was heard from: acknowledge what came (resumption)
    PING = enum.auto()  # due, and the peer was quiet (or a ping is unanswered): ack and ping
    GIVE_UP = enum.auto()  # nothing arrived within ping_timeout of a ping: the carrier is lost


#: (globals, not attribute lookups through the enum class: one check per session
#: and ping interval, on a relay with thousands of sessions)
_WAIT: Final = KeepaliveAction.WAIT
_ACK: Final = KeepaliveAction.ACK
_PING: Final = KeepaliveAction.PING
_GIVE_UP: Final = KeepaliveAction.GIVE_UP


class SessionKeepalive:
    """When one session pings, and when it gives up on a silent peer.

    Ping when nothing has arrived for ``interval`` (and every interval while a
    pong is awaited, so proxies that cut idle connections see traffic that
    often); give up when nothing at all arrived within ``timeout`` of the oldest
    unanswered ping. Anything from the peer within the interval (its own ping,
    which we answer) proves the link alive and moved bytes both ways, so our
    ping would add nothing: two ends with the same interval then ping about once
    an interval between them, not twice. On a relay with many idle agents that
    halves the ping exchanges and takes about a third off what idle sessions
    cost it (docs/PERFORMANCE.md, "One relay, many agents").
    """

    __slots__ = ("interval", "timeout", "slack", "_next_ping", "_waiting_since")

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.slack = interval * KEEPALIVE_SLACK
        self._next_ping = 0.0
        self._waiting_since: float | None = None  # when the oldest unanswered ping went out

    def start(self, now: float) -> float:
        """A new carrier from ``now``: returns the first check's deadline."""
        self._next_ping = now + self.interval
        self._waiting_since = None
        return self._next_ping

    def check(self, now: float, deadline: float, last_received: float) -> KeepaliveAction:
        """The check due at ``deadline``, run at ``now`` (early by up to the slack: it
        acts as at its deadline; the timeout counts from when the ping really went
        out); ``last_received``: when the peer's last bytes arrived."""
        at = max(now, deadline)
        waiting_since = self._waiting_since
        if waiting_since is not None and last_received >= waiting_since:
            waiting_since = self._waiting_since = None
        if waiting_since is not None and now >= waiting_since + self.timeout:
            return _GIVE_UP
        if at < self._next_ping:
            return _WAIT
        self._next_ping = at + self.interval
        if waiting_since is None and at - last_received < self.interval:
            # Next look when the peer will have been quiet for an interval, not an
            # interval from now: a peer silent since just after this check (a path gone
            # dead mid-transfer) was pinged only at the check after next, and dropped
            # up to 2 * interval + timeout after its last bytes. (Two slacks later than
            # that instant: a peer pinging every interval too, but with its own slack,
            # has pinged by then, and we need not.)
            self._next_ping = last_received + self.interval + 2 * self.slack
            return _ACK
        if waiting_since is None:
            self._waiting_since = now
        return _PING

    def due(self) -> Due:
        """When to check next (after a check that did not give up)."""
        waiting_since = self._waiting_since
        if waiting_since is not None and waiting_since + self.timeout < self._next_ping:
            return waiting_since + self.timeout, 0.0  # (never early: the drop is exact)
        return self._next_ping, self.slack
