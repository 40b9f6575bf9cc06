"""One timer task for the keepalive of many sessions.

Why: a relay with many idle agents used to run one sleeping keepalive task per
session, and each wake-up of a trio timer costs a cancel scope, a ``Cancelled``
raised and caught, and a scheduler round: 55-60 us on the test VM, as much as
the ping exchange it decides on. ``KeepaliveTimer`` keeps every session's next
check in one heap and wakes one task for all of them; a check may run up to its
``slack`` early, so the checks of sessions due within that window share one
wake-up (docs/PERFORMANCE.md, "One relay, many agents").

A check is a plain function called in the timer's task: it returns its next
deadline and slack, or None when it is done. The keepalive logic itself stays
with the session (net/transport.py); this module only decides when to call it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any, NoReturn

import trio

__all__ = ["KeepaliveTimer", "Scheduled", "Check", "Due"]

log = logging.getLogger("wstunnel.session")

#: A check's next (deadline, slack), or None: no more checks.
Due = tuple[float, float] | None
#: Called with (now, deadline) when due: ``now`` may be up to the slack before
#: ``deadline``.
Check = Callable[[float, float], Due]


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
