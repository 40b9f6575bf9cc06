"""What a ``TunnelStats`` holds, as its readers get it: Prometheus text and status.

``render_prometheus`` produces the text exposition format (version 0.0.4) for
``GET /metrics`` (dashboard_server.py); ``snapshot`` the per-session,
per-channel view that ``wstunnel status`` shows (admin.py). Apart from
metrics.py, whose hooks run for every channel, because this side runs only
when someone asks and reads the stats through their public readers
(``bytes_carried``, ``open_failure_counts``, ``channel_rates``...).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import __version__, mux
from ..net.udp_flow import UDP_DROP_REASONS, udp_stats

if TYPE_CHECKING:
    from ..net.channel_stream import ChannelStream
    from ..net.transport import TunnelTransport
    from .metrics import TunnelStats

__all__ = ["METRICS", "render_prometheus", "samples", "snapshot"]

# name -> (type, help). Every name is always exposed, so dashboards and alerts
# never see a series appear out of nowhere.
METRICS: Final = {
    "wstunnel_info": ("gauge", "Constant 1, labelled with the role and version."),
    "wstunnel_sessions": ("gauge", "WebSocket sessions currently up."),
    "wstunnel_sessions_total": ("counter", "WebSocket sessions established."),
    "wstunnel_channels_open": ("gauge", "Tunnelled TCP connections currently open."),
    "wstunnel_channels_total": ("counter", "Tunnelled TCP connections opened."),
    "wstunnel_forward_channels_open": ("gauge", "Channels open now, by forward name (its "
                                       "name:, else its command-line form)."),
    "wstunnel_forward_channels_total": ("counter", "Channels opened, by forward name."),
    "wstunnel_bytes_total": ("counter", "Payload bytes carried; direction=outbound is "
                             "local socket to tunnel, inbound is tunnel to local socket."),
    "wstunnel_channel_open_failures_total": ("counter", "Channel opens refused, by reason."),
    "wstunnel_auth_failures_total": ("counter", "Handshakes refused for bad or missing "
                                     "credentials (HTTP 401/403)."),
    "wstunnel_handshakes_evicted_total": ("counter", "Connections the relay closed before "
                                          "their handshake finished, the oldest, to make "
                                          "room for a new one (max_pending_handshakes)."),
    "wstunnel_reconnects_total": ("counter", "Times the agent re-established a lost session."),
    "wstunnel_buffered_bytes": ("gauge", "Bytes held in memory: inbound = received and not "
                                "yet written locally, outbound = accepted and not yet sent."),
    "wstunnel_scheduler_queue_depth": ("gauge", "Channels waiting for a send turn."),
    "wstunnel_outbound_budget_exhaustions_total": ("counter", "Times a session's outbound "
                                                   "budget (max_queued_size) was used up "
                                                   "and reading from its sources paused."),
    "wstunnel_reloads_total": ("counter", "Configuration reloads, by result."),
    "wstunnel_agent_bytes_total": ("counter", "Payload bytes carried for each agent (relay); "
                                   "direction=down is to the agent, up from it."),
    "wstunnel_agent_rate_limit_bytes": ("gauge", "An agent's rate_limit in bytes per second, "
                                        "by direction (relay; agents with a limit only)."),
    "wstunnel_agent_throttled_seconds_total": ("counter", "Seconds an agent's rate_limit held "
                                               "its traffic back, by direction (relay)."),
    "wstunnel_forward_rate_limit_bytes": ("gauge", "A forward's rate_limit in bytes per "
                                          "second, by direction (agent)."),
    "wstunnel_forward_throttled_seconds_total": ("counter", "Seconds a forward's rate_limit "
                                                 "held its traffic back, by direction (agent)."),
    "wstunnel_udp_flows_open": ("gauge", "UDP flows (one channel each) open now."),
    "wstunnel_udp_flows_total": ("counter", "UDP flows opened."),
    "wstunnel_udp_datagrams_total": ("counter", "UDP datagrams carried; direction=outbound "
                                     "is local socket to tunnel, inbound the other way."),
    "wstunnel_udp_dropped_total": ("counter", "UDP datagrams dropped, by reason (UDP is "
                                   "lossy: a flow drops rather than waits or grows)."),
}
_REASONS: Final = [reason.name.lower() for reason in mux.OpenFailure]


def samples(stats: TunnelStats) -> Iterator[tuple[str, dict[str, str], float]]:
    """(metric name, labels, value) for every series in :data:`METRICS`."""
    yield "wstunnel_info", {"role": stats.role, "version": __version__}, 1
    yield "wstunnel_sessions", {}, len(stats.sessions)
    yield "wstunnel_sessions_total", {}, stats.sessions_total
    yield "wstunnel_channels_open", {}, sum(1 for _ in stats.live_channels())
    yield "wstunnel_channels_total", {}, stats.channels_total
    open_by_forward = Counter(channel.forward for channel in stats.live_channels())
    for forward in sorted(name for name in stats.forward_channels if name is not None):
        yield ("wstunnel_forward_channels_open", {"forward": forward},
               open_by_forward[forward])
        yield ("wstunnel_forward_channels_total", {"forward": forward},
               stats.forward_channels[forward])
    outbound, inbound = stats.bytes_carried()
    yield "wstunnel_bytes_total", {"direction": "outbound"}, outbound
    yield "wstunnel_bytes_total", {"direction": "inbound"}, inbound
    failures = stats.open_failure_counts()
    for reason in sorted({*_REASONS, *failures}):
        yield "wstunnel_channel_open_failures_total", {"reason": reason}, failures[reason]
    yield "wstunnel_auth_failures_total", {}, stats.auth_failures
    yield "wstunnel_handshakes_evicted_total", {}, stats.handshakes_evicted
    yield "wstunnel_reconnects_total", {}, stats.reconnects
    sessions = [transport.protocol.session for transport in stats.sessions]
    yield ("wstunnel_buffered_bytes", {"direction": "inbound"},
           sum(s.buffered_size for s in sessions))
    yield ("wstunnel_buffered_bytes", {"direction": "outbound"},
           sum(s.queued_size for s in sessions))
    yield "wstunnel_scheduler_queue_depth", {}, sum(s.ready_count for s in sessions)
    yield ("wstunnel_outbound_budget_exhaustions_total", {},
           stats.ended_budget_exhaustions + sum(s.budget_exhaustions for s in sessions))
    for result in sorted(stats.reloads):
        yield "wstunnel_reloads_total", {"result": result}, stats.reloads[result]
    yield from _agent_samples(stats)


def _agent_samples(stats: TunnelStats) -> Iterator[tuple[str, dict[str, str], float]]:
    for (agent, direction), count in sorted(stats.agent_bytes().items()):
        yield "wstunnel_agent_bytes_total", {"agent": agent, "direction": direction}, count
    for (agent, direction), bucket in sorted(stats.agent_buckets.items()):
        labels = {"agent": agent, "direction": direction}
        yield "wstunnel_agent_rate_limit_bytes", labels, bucket.rate
        yield "wstunnel_agent_throttled_seconds_total", labels, bucket.throttled_time
    for (forward, direction), bucket in sorted(stats.forward_buckets.items()):
        labels = {"forward": forward, "direction": direction}
        yield "wstunnel_forward_rate_limit_bytes", labels, bucket.rate
        yield "wstunnel_forward_throttled_seconds_total", labels, bucket.throttled_time
    yield from _udp_samples()


def _udp_samples() -> Iterator[tuple[str, dict[str, str], float]]:
    """The process's UDP counters (net/udp_flow.py: one set per process)."""
    yield "wstunnel_udp_flows_open", {}, udp_stats.flows_active
    yield "wstunnel_udp_flows_total", {}, udp_stats.flows_opened
    yield "wstunnel_udp_datagrams_total", {"direction": "outbound"}, udp_stats.datagrams_sent
    yield ("wstunnel_udp_datagrams_total", {"direction": "inbound"},
           udp_stats.datagrams_received)
    for reason in sorted({*UDP_DROP_REASONS, *udp_stats.dropped}):
        yield "wstunnel_udp_dropped_total", {"reason": reason}, udp_stats.dropped[reason]


def render_prometheus(stats: TunnelStats) -> str:
    """The Prometheus text exposition of :func:`samples`, each metric's samples in
    one group after its HELP and TYPE: the format asks for that, and strict
    parsers (OpenMetrics) reject a metric whose lines are interleaved with
    another's, as per-forward and per-agent pairs would otherwise come."""
    grouped: dict[str, list[str]] = {}
    for name, labels, value in samples(stats):
        grouped.setdefault(name, []).append(f"{name}{_labels(labels)} {_number(value)}")
    lines: list[str] = []
    for name, series in grouped.items():
        kind, text = METRICS[name]
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *series]
    return "\n".join(lines) + "\n"


def snapshot(stats: TunnelStats) -> dict[str, Any]:
    """Sessions and channels as plain data for ``wstunnel status``."""
    now = trio.current_time()
    outbound, inbound = stats.bytes_carried()
    return {
        "role": stats.role, "pid": os.getpid(), "version": __version__,
        "uptime": time.time() - stats.started_at,
        "channels_total": stats.channels_total, "reconnects": stats.reconnects,
        "bytes_sent": outbound, "bytes_received": inbound,
        "open_failures": dict(+stats.open_failure_counts()),
        "sessions": [_session_view(stats, t, since, now) for t, since in stats.sessions.items()],
        "reverse_forwards": stats.reverse_forwards() if stats.reverse_forwards else [],
    }


def _session_view(stats: TunnelStats, transport: TunnelTransport, since: float,
                  now: float) -> dict[str, Any]:
    channels = [_channel_view(stats, c, now) for c in transport.channels.values()]
    return {"name": transport.name, "age": now - since,
            "transport": getattr(transport.stream, "transport_name", "websocket"),
            "channels_total":
            transport.opened_total, "channels": channels}


def _channel_view(stats: TunnelStats, channel: ChannelStream, now: float) -> dict[str, Any]:
    rate_sent, rate_received = stats.channel_rates(channel)
    return {
        "id": channel.channel_id, "destination": channel.destination,
        "forward": channel.forward,
        "age": stats.channel_age(channel, now),
        "bytes_sent": channel.bytes_sent, "bytes_received": channel.bytes_received,
        "rate_sent": rate_sent,
        "rate_received": rate_received,
    }


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
