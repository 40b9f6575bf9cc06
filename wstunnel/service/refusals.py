"""Log lines for refused channels that stay readable under a flood.

Theory of operation
-------------------
An agent that opens thousands of channels past a limit (or scans ports
through the relay) must not get thousands of log lines: they drown
everything else, and a logger that drops lines under load loses the count.
So refusals are grouped by (session, key), where the key names the cause
("max_channels 1024 reached", "forbidden"):

* the first refusal of a group is logged at once, in full: destination and
  why;
* later ones are counted, and one line per group and ``interval`` at most
  says how many there were and names a few of their destinations: "refused
  3,005 channels of 10.0.0.7:51234 (agent laptop): max_channels 1024 reached
  (to db:5432, db:5433 and others)";
* ``tick`` (about once a second) and ``session_ended`` write what is still
  counted, so the lines of a group always add up to its refusals.

A group quiet for ``interval`` starts afresh: its next refusal is logged in
full at once again. Time comes in as ``now`` (trio's clock in the roles), so
this is pure bookkeeping that tests drive with numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Final

__all__ = ["RefusalLog", "DEFAULT_INTERVAL"]

DEFAULT_INTERVAL: Final = 1.0
#: Destinations a count line names; beyond them it says "and others".
NAMED_DESTINATIONS: Final = 3
#: A group with nothing counted is forgotten after this long (``tick``).
_FORGET_AFTER: Final = 60.0


@dataclass
class _Group:
    name: str  # the session's name, for the line
    summary: str  # the cause, for the count line
    logged_at: float
    pending: int = 0
    destinations: dict[str, None] = field(default_factory=dict)  # the first few, in order
    others: bool = False  # more destinations than those

    def add(self, destination: str | None, count: int) -> None:
        self.pending += count
        if destination is None or destination in self.destinations:
            return
        if len(self.destinations) < NAMED_DESTINATIONS:
            self.destinations[destination] = None
        else:
            self.others = True


class RefusalLog:
    """Aggregated log lines of refused channels, per session and cause."""

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._groups: dict[tuple[Hashable, str], _Group] = {}

    def note(self, session: Hashable, name: str, key: str, summary: str,
             destination: str | None, detail: str, now: float, count: int = 1) -> None:
        """``count`` refusals in ``session`` (``name`` in the log) grouped under ``key``.

        Args:
            summary: the cause, for a count line ("max_channels 1024 reached").
            destination: where the channel was to go ("db:5432"), None if unknown.
            detail: why, in full, for the line of a group's first refusal.
        """
        group = self._groups.get((session, key))
        if group is None or (not group.pending and now - group.logged_at >= self.interval):
            group = self._groups[(session, key)] = _Group(name, summary, now)
            if count == 1 and destination is not None:
                self.logger.warning("%s: refused channel to %s: %s", name, destination, detail)
            else:
                group.add(destination, count)
                self._flush(group, now)
            return
        group.summary = summary
        group.add(destination, count)
        if now - group.logged_at >= self.interval:
            self._flush(group, now)

    def tick(self, now: float) -> None:
        """Write the counts that are due; forget groups long quiet."""
        for key, group in list(self._groups.items()):
            if group.pending and now - group.logged_at >= self.interval:
                self._flush(group, now)
            elif not group.pending and now - group.logged_at >= _FORGET_AFTER:
                del self._groups[key]

    def session_ended(self, session: Hashable) -> None:
        """Write what ``session`` still has counted, and forget it."""
        for key in [key for key in self._groups if key[0] == session]:
            group = self._groups.pop(key)
            if group.pending:
                self._flush(group, 0.0)

    def _flush(self, group: _Group, now: float) -> None:
        count = group.pending
        where = ", ".join(group.destinations)
        if group.others:
            where += " and others"
        self.logger.warning("refused %s channel%s of %s: %s%s", f"{count:,}",
                            "" if count == 1 else "s", group.name, group.summary,
                            f" (to {where})" if where else "")
        group.pending = 0
        group.logged_at = now
        group.destinations.clear()
        group.others = False
