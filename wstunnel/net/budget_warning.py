"""The warning that a session's outbound budget is full, at most once a minute.

Why a module of its own: the mux reports every episode at the budget
(``mux.OutboundBudgetExhausted``); a peer on a slow link may fill it often, and
each time is no news, so the transport (net/transport.py) logs the first and then
a count a minute, and keeps that state out of its own.
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from .. import mux

__all__ = ["BudgetWarning"]

log = logging.getLogger("wstunnel.session")

#: Seconds between two warnings for one session.
_QUIET_INTERVAL: Final = 60.0


class BudgetWarning:
    """One session's warnings that its outbound budget is full (max_queued_size)."""

    __slots__ = ("_logged_at", "_hits")

    def __init__(self) -> None:
        self._logged_at: float | None = None
        self._hits = 0  # (episodes since the last warning)

    def report(self, session: str, event: mux.OutboundBudgetExhausted) -> None:
        """Log the first episode, then at most once a minute with a count."""
        self._hits += 1
        now = trio.current_time()
        if self._logged_at is not None and now < self._logged_at + _QUIET_INTERVAL:
            return
        times = f" ({self._hits} times since the last report)" if (
            self._logged_at is not None) else ""
        self._logged_at = now
        self._hits = 0
        log.warning("%s: outbound budget full: %d KiB queued for the peer (max_queued_size); "
                    "its channels stop reading from their sources until it has taken half "
                    "-- it reads slower than they send, or not at all%s", session,
                    event.held_size >> 10, times)
