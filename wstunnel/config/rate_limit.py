"""The ``rate_limit:`` value, shared by the relay's agents and the agent's forwards."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RateLimit"]


@dataclass(frozen=True)
class RateLimit:
    """A ``rate_limit:`` section: bytes per second each way (None: no limit that way).

    ``down`` is what the relay sends towards the agent, ``up`` what the agent
    sends; ``burst`` is what may go at once after a pause (default: 0.1 s at
    the rate, at least 256 KiB; ``mux.pacing.default_burst``).
    """

    down: int | None = None
    up: int | None = None
    burst: int | None = None
