"""``forwards[].rate_limit``: one pair of token buckets per limited forward.

Theory of operation: the agent's session pulls its output through a
``mux.Pacer`` (mux/pacing.py) that knows each limited forward's buckets by the
forward's name (``Forward.label``); the transport names each channel's forward
as it opens (net/transport.py). ``up`` (what the agent sends) is the forward's
outbound bucket: a channel of it loses its scheduler turn while the bucket is
empty, the other channels go on. ``down`` is its inbound bucket: the agent
returns credit for the forward's channels no faster than the rate, which holds
the relay's sender back (docs/PROTOCOL.md section 10.1). The buckets outlive a
session (a reconnect does not grant a new burst) and are reconfigured from
the forwards as they are at each connect.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import mux
from ..config import Forward
from ..protocol import TunnelProtocol

__all__ = ["ForwardLimits"]


class ForwardLimits:
    """The buckets of the agent's limited forwards, by forward name."""

    def __init__(self, registry: dict[tuple[str, str], mux.TokenBucket] | None = None) -> None:
        self.buckets: dict[str, mux.pacing.Limits] = {}
        #: The same buckets by (forward, "up" or "down"), for the metrics.
        self.registry = {} if registry is None else registry

    def pace(self, protocol: TunnelProtocol, forwards: Iterable[Forward], now: float) -> None:
        """Attach the forwards' buckets (made or reconfigured now) to a new session."""
        buckets: dict[str, mux.pacing.Limits] = {}
        for forward in forwards:
            limit = forward.rate_limit
            if limit is not None:
                old = self.buckets.get(forward.label, (None, None))
                buckets[forward.label] = (_bucket(old[0], limit.up, limit.burst, now),
                                          _bucket(old[1], limit.down, limit.burst, now))
        self.buckets = buckets
        self.registry.clear()
        for label, (up, down) in buckets.items():
            self.registry.update({(label, direction): bucket for direction, bucket
                                  in (("up", up), ("down", down)) if bucket is not None})
        if buckets:
            protocol.pace(forwards=buckets)


def _bucket(bucket: mux.TokenBucket | None, rate: int | None, burst: int | None,
            now: float) -> mux.TokenBucket | None:
    if rate is None:
        return None
    if bucket is None:
        return mux.TokenBucket(rate, burst, now=now)
    bucket.configure(rate, burst)
    return bucket
