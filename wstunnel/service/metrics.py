"""Counters and gauges of one agent or relay, as Prometheus text and as JSON.

Theory of operation
-------------------
A ``TunnelStats`` object is created per process and handed to the role, which
reports the few events that counters need (session up/down, channel
opened/closed, open refused, reconnect, auth failure). Everything that is a
*state* (sessions and channels open, bytes buffered, scheduler queue depth,
bytes of the channels still open) is read from the live transports when
asked, so it can never drift from the truth. Bytes of closed channels are
folded into running totals when the channel is closed.

``render_prometheus`` produces the text exposition format (version 0.0.4);
``snapshot`` the per-session, per-channel view that ``wstunnel status`` shows.
``sample`` (called about once a second) turns byte counts into rates.
``serve_metrics`` is a minimal HTTP/1.1 server (h11) for ``GET /metrics``.

Refused channels are counted by reason, and logged through a ``RefusalLog``
(refusals.py: the first of a kind at once, then a count at most once a second
per session and cause; ``sample`` writes the counts that are due). The relay
reports its own refusals with ``channel_refused``; OPENs the multiplexer
refuses by itself (after GOAWAY, past its channel limit) are read from each
session's ``refused_opens``: live sessions when asked, and folded into the
totals when the session ends.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn

import h11
import trio

from .. import __version__, mux
from ..security.policy import Listener, this_host
from .refusals import RefusalLog

if TYPE_CHECKING:
    from ..addresses import HostPort
    from ..net.channel_stream import ChannelStream
    from ..net.transport import TunnelTransport

__all__ = ["METRICS", "TunnelStats", "serve_metrics"]

log = logging.getLogger("wstunnel.metrics")

# name -> (type, help). Every name is always exposed, so dashboards and alerts
# never see a series appear out of nowhere.
METRICS: Final = {
    "wstunnel_info": ("gauge", "Constant 1, labelled with the role and version."),
    "wstunnel_sessions": ("gauge", "WebSocket sessions currently up."),
    "wstunnel_sessions_total": ("counter", "WebSocket sessions established."),
    "wstunnel_channels_open": ("gauge", "Tunnelled TCP connections currently open."),
    "wstunnel_channels_total": ("counter", "Tunnelled TCP connections opened."),
    "wstunnel_bytes_total": ("counter", "Payload bytes carried; direction=outbound is "
                             "local socket to tunnel, inbound is tunnel to local socket."),
    "wstunnel_channel_open_failures_total": ("counter", "Channel opens refused, by reason."),
    "wstunnel_auth_failures_total": ("counter", "Handshakes refused for bad or missing "
                                     "credentials (HTTP 401/403)."),
    "wstunnel_reconnects_total": ("counter", "Times the agent re-established a lost session."),
    "wstunnel_buffered_bytes": ("gauge", "Bytes held in memory: inbound = received and not "
                                "yet written locally, outbound = accepted and not yet sent."),
    "wstunnel_scheduler_queue_depth": ("gauge", "Channels waiting for a send turn."),
    "wstunnel_outbound_budget_exhaustions_total": ("counter", "Times a session's outbound "
                                                   "budget (max_queued_size) was used up "
                                                   "and reading from its sources paused."),
    "wstunnel_reloads_total": ("counter", "Configuration reloads, by result."),
}
_REASONS: Final = [reason.name.lower() for reason in mux.OpenFailure]
_CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"
_REQUEST_TIMEOUT: Final = 10.0
_MAX_REQUEST_SIZE: Final = 16384


@dataclass
class _Rate:
    at: float
    sent: int
    received: int
    sent_rate: float = 0.0
    received_rate: float = 0.0


class TunnelStats:
    """What one agent or relay process has done, and what it holds now.

    Its sessions report their channels to it as their ``SessionObserver``
    (net/observer.py: ``channel_opened``, ``channel_closed``, ``open_failed``);
    the roles report sessions, refusals and reconnects.
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self.started_at = time.time()
        self.sessions: dict[TunnelTransport, float] = {}  # -> trio time it came up
        self.sessions_total = 0
        self.channels_total = 0
        self.closed_bytes_sent = 0
        self.closed_bytes_received = 0
        self.open_failures: Counter[str] = Counter()
        self.ended_budget_exhaustions = 0  # of sessions that ended
        self.auth_failures = 0
        self.reconnects = 0
        self.reloads: Counter[str] = Counter({"ok": 0, "failed": 0})
        self.on_change: list[Callable[[], None]] = []  # called when sessions come and go
        self._opened_at: dict[ChannelStream, float] = {}
        self._rates: dict[ChannelStream, _Rate] = {}
        self.refusals = RefusalLog(logging.getLogger(f"wstunnel.{role}"))
        # Multiplexer refusals already logged, per session.
        self._mux_refusals_logged: dict[TunnelTransport, dict[mux.OpenFailure, int]] = {}

    # -- events reported by the roles ----------------------------------------------

    def session_started(self, transport: TunnelTransport) -> None:
        self.sessions[transport] = trio.current_time()
        self.sessions_total += 1
        self._changed()

    def session_ended(self, transport: TunnelTransport) -> None:
        if self.sessions.pop(transport, None) is not None:
            self.log_mux_refusals(transport)
            for reason, count in transport.protocol.session.refused_opens.items():
                self.open_failures[_reason_name(reason)] += count
            self.ended_budget_exhaustions += transport.protocol.session.budget_exhaustions
            self._mux_refusals_logged.pop(transport, None)
            self.refusals.session_ended(transport)
            self._changed()

    # -- net.observer.SessionObserver: reported by each session's transport ------------

    def channel_opened(self, channel: ChannelStream) -> None:
        self.channels_total += 1
        self._opened_at[channel] = trio.current_time()

    def channel_closed(self, channel: ChannelStream) -> None:
        if self._opened_at.pop(channel, None) is not None:
            self.closed_bytes_sent += channel.bytes_sent
            self.closed_bytes_received += channel.bytes_received
        self._rates.pop(channel, None)

    def open_failed(self, reason: int) -> None:
        self.open_failures[_reason_name(reason)] += 1

    # -- refusals, reported by the relay -----------------------------------------------

    def channel_refused(self, transport: TunnelTransport, reason: mux.OpenFailure, text: str,
                        destination: str, *, key: str | None = None) -> None:
        """The relay refused a channel of ``transport``: count it, log it in aggregate.

        ``text`` says why. ``key`` groups the log lines and is what a line for
        several refusals says about them: a text that is the same for all of
        them ("max_channels 1024 reached"); by default the reason ("forbidden").
        """
        self.open_failed(reason)
        if key is None:
            key = _reason_name(reason).replace("_", " ")
        self.refusals.note(transport, transport.name, key, key, destination, text,
                           trio.current_time())

    def log_mux_refusals(self, transport: TunnelTransport) -> None:
        """Log the OPENs the session's multiplexer refused by itself since the last call."""
        refused = transport.protocol.session.refused_opens
        if not refused:  # (the relay asks once per OPEN: the usual answer is this cheap)
            return
        logged = self._mux_refusals_logged.setdefault(transport, {})
        if refused == logged:
            return
        now = trio.current_time()
        for reason, count in refused.items():
            new = count - logged.get(reason, 0)
            if new:
                logged[reason] = count
                summary = _MUX_REFUSALS.get(reason, reason.name.lower())
                self.refusals.note(transport, transport.name, f"multiplexer {reason.name}",
                                   summary, None, summary, now, new)

    def _changed(self) -> None:
        for callback in list(self.on_change):
            callback()

    # -- reading ---------------------------------------------------------------------

    def live_channels(self) -> Iterator[ChannelStream]:
        for transport in self.sessions:
            yield from transport.channels.values()

    def bytes_carried(self) -> tuple[int, int]:
        """(outbound, inbound) bytes over the process's lifetime."""
        sent, received = self.closed_bytes_sent, self.closed_bytes_received
        for channel in self.live_channels():
            if channel in self._opened_at:
                sent += channel.bytes_sent
                received += channel.bytes_received
        return sent, received

    def sample(self) -> None:
        """Update per-channel rates from the bytes carried since the last call; write
        the refusal counts that are due."""
        now = trio.current_time()
        for transport in self.sessions:
            self.log_mux_refusals(transport)
        self.refusals.tick(now)
        for channel in self.live_channels():
            last = self._rates.get(channel)
            if last is None:
                self._rates[channel] = _Rate(now, channel.bytes_sent, channel.bytes_received)
            elif now > last.at:
                elapsed = now - last.at
                last.sent_rate = (channel.bytes_sent - last.sent) / elapsed
                last.received_rate = (channel.bytes_received - last.received) / elapsed
                last.at, last.sent, last.received = now, channel.bytes_sent, channel.bytes_received

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """(metric name, labels, value) for every series in :data:`METRICS`."""
        yield "wstunnel_info", {"role": self.role, "version": __version__}, 1
        yield "wstunnel_sessions", {}, len(self.sessions)
        yield "wstunnel_sessions_total", {}, self.sessions_total
        yield "wstunnel_channels_open", {}, sum(1 for _ in self.live_channels())
        yield "wstunnel_channels_total", {}, self.channels_total
        outbound, inbound = self.bytes_carried()
        yield "wstunnel_bytes_total", {"direction": "outbound"}, outbound
        yield "wstunnel_bytes_total", {"direction": "inbound"}, inbound
        failures = self.open_failure_counts()
        for reason in sorted({*_REASONS, *failures}):
            yield "wstunnel_channel_open_failures_total", {"reason": reason}, failures[reason]
        yield "wstunnel_auth_failures_total", {}, self.auth_failures
        yield "wstunnel_reconnects_total", {}, self.reconnects
        sessions = [transport.protocol.session for transport in self.sessions]
        yield ("wstunnel_buffered_bytes", {"direction": "inbound"},
               sum(s.buffered_size for s in sessions))
        yield ("wstunnel_buffered_bytes", {"direction": "outbound"},
               sum(s.queued_size for s in sessions))
        yield "wstunnel_scheduler_queue_depth", {}, sum(s.ready_count for s in sessions)
        yield ("wstunnel_outbound_budget_exhaustions_total", {},
               self.ended_budget_exhaustions + sum(s.budget_exhaustions for s in sessions))
        for result in sorted(self.reloads):
            yield "wstunnel_reloads_total", {"result": result}, self.reloads[result]

    def open_failure_counts(self) -> Counter[str]:
        """Refused opens by reason: reported ones, and those the live sessions'
        multiplexers refused by themselves."""
        counts = Counter(self.open_failures)
        for transport in self.sessions:
            for reason, count in transport.protocol.session.refused_opens.items():
                counts[_reason_name(reason)] += count
        return counts

    def render_prometheus(self) -> str:
        """The Prometheus text exposition of :meth:`samples`."""
        lines: list[str] = []
        seen: set[str] = set()
        for name, labels, value in self.samples():
            if name not in seen:
                seen.add(name)
                kind, text = METRICS[name]
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines.append(f"{name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"

    def snapshot(self) -> dict[str, Any]:
        """Sessions and channels as plain data for ``wstunnel status``."""
        now = trio.current_time()
        outbound, inbound = self.bytes_carried()
        return {
            "role": self.role, "pid": os.getpid(), "version": __version__,
            "uptime": time.time() - self.started_at,
            "channels_total": self.channels_total, "reconnects": self.reconnects,
            "bytes_sent": outbound, "bytes_received": inbound,
            "open_failures": dict(+self.open_failure_counts()),
            "sessions": [self._session_view(t, since, now) for t, since in self.sessions.items()],
        }

    def _session_view(self, transport: TunnelTransport, since: float, now: float) -> dict[str, Any]:
        channels = [self._channel_view(c, now) for c in transport.channels.values()]
        return {"name": transport.name, "age": now - since, "channels_total":
                transport.opened_total, "channels": channels}

    def _channel_view(self, channel: ChannelStream, now: float) -> dict[str, Any]:
        rate = self._rates.get(channel)
        return {
            "id": channel.channel_id, "destination": channel.destination,
            "age": now - self._opened_at.get(channel, now),
            "bytes_sent": channel.bytes_sent, "bytes_received": channel.bytes_received,
            "rate_sent": rate.sent_rate if rate else 0.0,
            "rate_received": rate.received_rate if rate else 0.0,
        }


_MUX_REFUSALS: Final = {
    mux.OpenFailure.GOING_AWAY: "the session is going away (GOAWAY sent or received)",
    mux.OpenFailure.LIMIT_REACHED: "the session's channel limit (max_channels) reached, "
    "answered by the multiplexer",
    mux.OpenFailure.UNSUPPORTED_KIND: "unsupported channel kind",
}


def _reason_name(reason: int) -> str:
    try:
        return mux.OpenFailure(reason).name.lower()
    except ValueError:
        return "other"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ------------------------------------------------------------------ HTTP server

async def serve_metrics(
    stats: TunnelStats, address: HostPort, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Serve ``GET /metrics`` on ``address`` until cancelled.

    ``task_status.started`` receives the bound (host, port) pairs.
    """
    listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    log.info("metrics on %s", ", ".join(f"http://{h}:{p}/metrics" for h, p in bound))
    # A relay must not open channels to its own metrics (policy.py).
    own = [Listener.bound(host, port, "metrics port") for host, port in bound]
    this_host.add_listeners(own)
    try:
        async with trio.open_nursery() as nursery:
            handler = _metrics_handler(stats)
            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started(bound)
    finally:
        this_host.remove_listeners(own)
    raise AssertionError("serve_listeners returned")  # pragma: no cover


def _metrics_handler(stats: TunnelStats) -> Callable[[trio.SocketStream], Any]:
    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(_REQUEST_TIMEOUT):
                await _answer(stream, stats)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("metrics client went away: %s", exc)
        finally:
            await trio.aclose_forcefully(stream)

    return handle


async def _answer(stream: trio.SocketStream, stats: TunnelStats) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_SIZE)
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError:
            await _respond(stream, connection, 400, b"bad request\n")
            return
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(4096))
        elif isinstance(event, h11.Request):
            break
        else:
            return
    path = event.target.split(b"?", 1)[0]
    if event.method not in (b"GET", b"HEAD"):
        await _respond(stream, connection, 405, b"use GET /metrics\n")
    elif path != b"/metrics":
        await _respond(stream, connection, 404, b"metrics are at /metrics\n")
    else:
        body = stats.render_prometheus().encode()
        await _respond(stream, connection, 200, body, head=event.method == b"HEAD")


async def _respond(stream: trio.SocketStream, connection: h11.Connection, status: int,
                   body: bytes, *, head: bool = False) -> None:
    content_type = _CONTENT_TYPE if status == 200 else b"text/plain; charset=utf-8"
    headers = [(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body)),
               (b"Connection", b"close")]
    data = connection.send(h11.Response(status_code=status, headers=headers))
    data = (data or b"") + (b"" if head else connection.send(h11.Data(data=body)) or b"")
    data += connection.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
