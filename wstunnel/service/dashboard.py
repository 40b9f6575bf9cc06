"""What the dashboard keeps between samples: meters, the rate history, refusals.

Theory of operation
-------------------
The relay must not pay for a page someone may be looking at. Nothing here
runs per DATA record: ``TunnelStats.sample`` (once a second) folds what the
channels carried since the last sample into a ``Meter`` per session
(``SessionInfo``) and appends one point to a ``History`` ring of
``HISTORY_SIZE`` points; a refused channel adds one ``Refusal`` to a short
ring. All of it is bounded; dashboard_status.py turns it into the JSON
document the page polls.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Final

__all__ = ["HISTORY_SIZE", "RECENT_REFUSALS", "History", "Meter", "Refusal", "SessionInfo",
           "new_refusals"]

#: Points of the rate graph: one a second, five minutes.
HISTORY_SIZE: Final = 300
#: Refusals the document lists one by one (all are counted by reason).
RECENT_REFUSALS: Final = 20


@dataclass
class Meter:
    """Bytes carried each way, and their rate between the last two ``tick``\\ s."""

    sent: int = 0
    received: int = 0
    sent_rate: float = 0.0
    received_rate: float = 0.0
    _at: float | None = None
    _last: tuple[int, int] = (0, 0)

    def add(self, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received

    def tick(self, now: float) -> None:
        """Rates from what was added since the previous tick (``now``: seconds)."""
        if self._at is not None and now > self._at:
            elapsed = now - self._at
            self.sent_rate = (self.sent - self._last[0]) / elapsed
            self.received_rate = (self.received - self._last[1]) / elapsed
        if self._at is None or now > self._at:
            self._at, self._last = now, (self.sent, self.received)


@dataclass
class SessionInfo:
    """A session as the dashboard shows it, beyond its live channels.

    ``meter`` counts what the session's channels carried: the sampler adds
    what live channels carried since the last sample, a closing channel the
    rest. ``forwards`` counts the channels opened, by forward name.
    """

    agent: str | None  # the agent's name (relay), None where unknown (agent side)
    peer: str  # the other end: the agent's address, or the relay's URL
    tls: bool
    up_since: float  # wall clock
    meter: Meter = field(default_factory=Meter)
    forwards: Counter[str | None] = field(default_factory=Counter)


@dataclass(frozen=True)
class Refusal:
    """One refused channel open (or ``count`` alike), for the recent list."""

    at: float  # wall clock
    session: str
    reason: str
    destination: str | None
    text: str
    count: int = 1


class History:
    """The process's rate each way, one point per ``add``, the last ``size`` kept."""

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        self.points: deque[tuple[float, float, float]] = deque(maxlen=size)
        self._meter = Meter()
        self._started = False

    def add(self, now: float, wall: float, sent: int, received: int) -> None:
        """Record the totals ``sent``/``received`` at ``now`` (monotonic) = ``wall``."""
        meter = self._meter
        meter.add(sent - meter.sent, received - meter.received)
        meter.tick(now)
        if self._started:
            self.points.append((wall, meter.sent_rate, meter.received_rate))
        self._started = True

    @property
    def rates(self) -> tuple[float, float]:
        """(outbound, inbound) bytes per second at the last point."""
        return self._meter.sent_rate, self._meter.received_rate


def new_refusals() -> deque[Refusal]:
    """The ring of recent refusals ``TunnelStats`` keeps."""
    return deque(maxlen=RECENT_REFUSALS)
