"""The warnings that a session's budget is full, at most once a minute.

Why a module of its own: the mux reports every episode at its outbound budget
(``mux.OutboundBudgetExhausted``), and the replay log every episode at its limit
(``ReplayLimitReached``: the peer has not acknowledged max_queued_size); a peer on
a slow link may fill either often, and each time is no news, so the session
(net/peer_events.py) logs the first and then a count a minute, and keeps that state
out of its own.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from .. import mux
from ..replay import ReplayLimitReached

__all__ = ["BudgetWarning"]

log = logging.getLogger("wstunnel.session")

#: Seconds between two warnings for one session.
_QUIET_INTERVAL: Final = 60.0


class BudgetWarning:
    """One session's warnings that one of its budgets is full (one instance each)."""

    __slots__ = ("_logged_at", "_hits")

    def __init__(self) -> None:
        self._logged_at: float | None = None
        self._hits = 0  # (episodes since the last warning)

    def report(self, session: str,
               event: mux.OutboundBudgetExhausted | ReplayLimitReached) -> None:
        """Log the first episode, then at most once a minute with a count."""
        self._hits += 1
        now = trio.current_time()
        if self._logged_at is not None and now < self._logged_at + _QUIET_INTERVAL:
            return
        times = f" ({self._hits} times since the last report)" if (
            self._logged_at is not None) else ""
        self._logged_at = now
        self._hits = 0
        if isinstance(event, ReplayLimitReached):
            log.warning("%s: the peer has not acknowledged %d KiB sent to it, kept to resume "
                        "the session (max_queued_size); nothing more goes to it until it does "
                        "-- a peer that does not acknowledge (docs/PROTOCOL.md section 12), or "
                        "a link whose bandwidth-delay product is above max_queued_size: raise "
                        "it%s", session, event.kept_size >> 10, times)
            return
        log.warning("%s: outbound budget full: %d KiB queued for the peer (max_queued_size); "
                    "its channels stop reading from their sources until it has taken half "
                    "-- it reads slower than they send, or not at all%s", session,
                    event.held_size >> 10, times)
