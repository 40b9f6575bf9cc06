"""The dashboard's JSON document (``GET /api/status``), from ``TunnelStats``.

It is built at most once per sample however many browsers poll
(``DocumentCache``: the sampler runs once a second), and lists at most
``MAX_SESSIONS_SHOWN`` sessions (the busiest), so a relay with many sessions
and many viewers pays a bounded price. Its fields are listed in
docs/CONFIG.md ("The dashboard"): a test holds the two together.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from .. import __version__
from .dashboard import Refusal, SessionInfo

if TYPE_CHECKING:
    from ..net.channel_stream import ChannelStream
    from .metrics import TunnelStats

__all__ = ["MAX_SESSIONS_SHOWN", "DocumentCache", "status_document"]

#: Sessions the document lists (the busiest first); the totals count all of them.
MAX_SESSIONS_SHOWN: Final = 100
#: How the dashboard names a session's transport when its stream does not say
#: (the HTTP transports' streams have ``transport_name``: streaming, polling).
TRANSPORT: Final = "websocket"
NO_FORWARD: Final = "-"


class DocumentCache:
    """The encoded document, rebuilt only after a new sample: many pollers, one build."""

    def __init__(self, stats: TunnelStats) -> None:
        self.stats = stats
        self._key: int | None = None
        self._body = b""

    def body(self) -> bytes:
        key = self.stats.samples_taken
        if key != self._key or key == 0:
            self._body = json.dumps(status_document(self.stats), separators=(",", ":")).encode()
            self._key = key
        return self._body


def status_document(stats: TunnelStats) -> dict[str, Any]:
    """Everything the dashboard shows, as plain data (``GET /api/status``)."""
    outbound, inbound = stats.bytes_carried()
    rate_out, rate_in = stats.history.rates
    sessions = [_session(stats, transport, info) for transport, info in stats.session_info.items()]
    sessions.sort(key=lambda s: (-(s["rate_out"] + s["rate_in"]), s["up_since"]))
    failures = stats.open_failure_counts()
    return {
        "role": stats.role, "version": __version__, "pid": os.getpid(),
        "now": time.time(), "started_at": stats.started_at,
        "totals": {
            "sessions": len(stats.sessions), "sessions_total": stats.sessions_total,
            "channels_open": sum(1 for _ in stats.live_channels()),
            "channels_total": stats.channels_total,
            "bytes_out": outbound, "bytes_in": inbound, "rate_out": rate_out, "rate_in": rate_in,
            "refusals": sum(failures.values()), "auth_failures": stats.auth_failures,
            "reconnects": stats.reconnects,
        },
        "history": {"interval": 1.0, "points": [list(p) for p in stats.history.points]},
        "sessions": sessions[:MAX_SESSIONS_SHOWN],
        "forwards": _forwards(stats.forward_channels, stats.live_channels()),
        "refusals": {"by_reason": dict(sorted((+failures).items())),
                     "recent": [_refusal(r) for r in reversed(stats.recent_refusals)]},
    }


def transport_name(transport: Any) -> str:
    """What carries the session: websocket, streaming or polling."""
    return str(getattr(getattr(transport, "stream", None), "transport_name", TRANSPORT))


def _session(stats: TunnelStats, transport: Any, info: SessionInfo) -> dict[str, Any]:
    meter = info.meter
    return {
        "agent": info.agent, "peer": info.peer, "transport": transport_name(transport),
        "tls": info.tls,
        "up_since": info.up_since, "channels_open": len(transport.channels),
        "channels_total": transport.opened_total,
        "bytes_out": meter.sent, "bytes_in": meter.received,
        "rate_out": meter.sent_rate, "rate_in": meter.received_rate,
        "forwards": _forwards(info.forwards, transport.channels.values()),
    }


def _forwards(opened: Counter[str | None],
              live: Iterable[ChannelStream]) -> list[dict[str, Any]]:
    """Channels per forward name: open now, and opened in all."""
    open_now: Counter[str | None] = Counter(channel.forward for channel in live)
    names = sorted({*open_now, *opened}, key=lambda name: name or "")
    return [{"forward": name or NO_FORWARD, "channels_open": open_now[name],
             "channels_total": opened[name]} for name in names]


def _refusal(refusal: Refusal) -> dict[str, Any]:
    return {"at": refusal.at, "session": refusal.session, "reason": refusal.reason,
            "destination": refusal.destination, "text": refusal.text, "count": refusal.count}
