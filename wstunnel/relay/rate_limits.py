"""Per-agent bandwidth limits: one token bucket per agent and direction.

Theory of operation
-------------------
``agents[].rate_limit`` (``rate_limit`` for the anonymous agent of a
``no_auth`` relay) limits all of an agent's sessions together, so the buckets
(sans-IO, mux/pacing.py) live per relay, keyed by (agent, "down" or "up"),
in ``TunnelStats.agent_buckets`` (the metrics read their throttled time
there). Each session's protocol gets its agent's buckets at start
(``pace_session``); its writer refills them with trio's clock and waits for
them (net/transport.py). ``down`` limits the DATA the relay sends to the
agent, ``up`` the credit it returns to the agent (docs/PROTOCOL.md section 10.1).

A reload changes a limit's rate and burst at once, for the sessions already
up too (``reconfigure``: the shared bucket changes); a limit added or removed
applies to the agent's sessions that start after the reload.
"""

from __future__ import annotations

from typing import Final

from .. import mux
from ..config import RateLimit, RelayConfig
from ..protocol import TunnelProtocol
from ..security.auth import ANONYMOUS

__all__ = ["DIRECTIONS", "Buckets", "limit_of", "pace_session", "reconfigure"]

#: Bucket keys: what the relay sends to the agent, what the agent sends.
DIRECTIONS: Final = ("down", "up")
Buckets = dict[tuple[str, str], mux.TokenBucket]


def limit_of(config: RelayConfig, agent: str) -> RateLimit | None:
    """The agent's configured limit, or None."""
    if agent == ANONYMOUS:
        return config.rate_limit
    for account in config.agents:
        if account.name == agent:
            return account.rate_limit
    return None


def pace_session(protocol: TunnelProtocol, agent: str, config: RelayConfig,
                 buckets: Buckets, now: float) -> None:
    """Attach the agent's buckets (made on its first session) to ``protocol``."""
    limit = limit_of(config, agent)
    if limit is None:
        return
    down = _bucket(buckets, agent, "down", limit.down, limit.burst, now)
    up = _bucket(buckets, agent, "up", limit.up, limit.burst, now)
    protocol.pace(outbound=down, inbound=up)


def reconfigure(buckets: Buckets, config: RelayConfig) -> None:
    """Give existing buckets the reloaded rates (a removed limit keeps its bucket
    for the sessions already up, and for the metrics)."""
    for (agent, direction), bucket in buckets.items():
        limit = limit_of(config, agent)
        rate = None if limit is None else getattr(limit, direction)
        if rate is not None and limit is not None:
            bucket.configure(rate, limit.burst)


def _bucket(buckets: Buckets, agent: str, direction: str, rate: int | None,
            burst: int | None, now: float) -> mux.TokenBucket | None:
    if rate is None:
        return None
    bucket = buckets.get((agent, direction))
    if bucket is None:
        bucket = buckets[agent, direction] = mux.TokenBucket(rate, burst, now=now)
    elif bucket.rate != rate or bucket.burst != (burst or mux.pacing.default_burst(rate)):
        bucket.configure(rate, burst)
    return bucket
