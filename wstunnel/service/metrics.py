"""Counters and gauges of one agent or relay: what the roles report, and readers over it.

Theory of operation
-------------------
A ``TunnelStats`` object is created per process and handed to the role, which
reports the few events that counters need (session up/down, channel
opened/closed, open refused, reconnect, auth failure). Everything that is a
*state* (sessions and channels open, bytes buffered, scheduler queue depth,
bytes of the channels still open) is read from the live transports when
asked, so it can never drift from the truth. Bytes of closed channels are
folded into running totals when the channel is closed.

metrics_output.py renders them (``render_prometheus``: the text exposition
format; ``snapshot``: the per-session, per-channel view of ``wstunnel status``).
``sample`` (called about once a second) turns byte counts into rates and
feeds the dashboard's bounded history (dashboard.py); nothing here runs per
DATA record. The HTTP listener for ``GET /metrics`` and the dashboard is in
dashboard_server.py (``serve_metrics``).

Refused channels are counted by reason, and logged through a ``RefusalLog``
(refusals.py: the first of a kind at once, then a count at most once a second
per session and cause; ``sample`` writes the counts that are due). The relay
reports its own refusals with ``channel_refused``; OPENs the multiplexer
refuses by itself (after GOAWAY, past its channel limit) are counted in each
session's ``refused_opens``, read for live sessions when asked and folded into
the totals when the session ends; a session reports each such refusal
(``peer_open_refused``), so that ``sample`` logs only the sessions that had one
instead of walking all of them every second.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import trio

from .. import mux
from ..net.tls_stream import TLSSocketStream
from .access_log import AccessLog
from .dashboard import History, Refusal, SessionInfo, new_refusals
from .refusals import RefusalLog

if TYPE_CHECKING:
    from ..net.channel_stream import ChannelStream
    from ..net.transport import TunnelTransport

__all__ = ["TunnelStats"]

log = logging.getLogger("wstunnel.metrics")


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
        #: Connections the relay closed in their handshake to make room for a new one
        #: (max_pending_handshakes; relay/handshakes.py).
        self.handshakes_evicted = 0
        self.reconnects = 0
        self.reloads: Counter[str] = Counter({"ok": 0, "failed": 0})
        # For the dashboard (dashboard.py): sampled, bounded.
        self.session_info: dict[TunnelTransport, SessionInfo] = {}
        self.forward_channels: Counter[str | None] = Counter()  # opened, by forward name
        self.history = History()
        self.recent_refusals = new_refusals()
        self.samples_taken = 0
        self.on_change: list[Callable[[], None]] = []  # called when sessions come and go
        #: One line per finished channel while ``access_log`` is on (access_log.py).
        self.access_log: AccessLog | None = None
        #: The reverse forwards' state, for ``wstunnel status``: set by the role (the
        #: agent's leases, the relay's listeners); one dict of text per row.
        self.reverse_forwards: Callable[[], list[dict[str, str]]] | None = None
        self._opened_at: dict[ChannelStream, float] = {}
        #: Per agent (relay): bytes of its closed channels, by (agent, "down" or "up"),
        #: and its rate limits' buckets (relay/rate_limits.py keeps them here).
        self.agent_closed_bytes: Counter[tuple[str, str]] = Counter()
        self.agent_buckets: dict[tuple[str, str], mux.TokenBucket] = {}
        #: The agent's forwards[].rate_limit buckets, by (forward, "up" or "down").
        self.forward_buckets: dict[tuple[str, str], mux.TokenBucket] = {}
        self._rates: dict[ChannelStream, _Rate] = {}
        self.refusals = RefusalLog(logging.getLogger(f"wstunnel.{role}"))
        # Multiplexer refusals already logged, per session.
        self._mux_refusals_logged: dict[TunnelTransport, dict[mux.OpenFailure, int]] = {}
        #: Sessions whose multiplexer refused an OPEN since the last sample (told by
        #: ``peer_open_refused``): the sampler logs those, and walks no other session.
        self._mux_refusing: dict[TunnelTransport, None] = {}
        #: Sessions whose meters the sampler ticks: those with channels, until a tick
        #: finds them with none and nothing moved (an idle one costs it nothing).
        self._metered: dict[TunnelTransport, None] = {}

    # -- events reported by the roles ----------------------------------------------

    def session_started(self, transport: TunnelTransport, *, agent: str | None = None,
                        peer: str | None = None) -> None:
        """``transport`` is up: ``agent`` names the agent (relay side), ``peer`` is the
        other end's address (the session's name by default), for the dashboard."""
        self.sessions[transport] = trio.current_time()
        self.session_info[transport] = SessionInfo(
            agent, peer or transport.name, _is_tls(transport.stream), time.time())
        self.sessions_total += 1
        self._changed()

    def session_ended(self, transport: TunnelTransport) -> None:
        if self.sessions.pop(transport, None) is not None:
            self.session_info.pop(transport, None)
            self._metered.pop(transport, None)
            self.log_mux_refusals(transport)
            for reason, count in transport.protocol.session.refused_opens.items():
                self.open_failures[_reason_name(reason)] += count
            self.ended_budget_exhaustions += transport.protocol.session.budget_exhaustions
            self._mux_refusals_logged.pop(transport, None)
            self._mux_refusing.pop(transport, None)
            self.refusals.session_ended(transport)
            self._changed()

    # -- net.observer.SessionObserver: reported by each session's transport ------------

    def channel_opened(self, channel: ChannelStream) -> None:
        self.channels_total += 1
        self.forward_channels[channel.forward] += 1
        now = self._opened_at[channel] = trio.current_time()
        info = self._session_of(channel)
        if info is not None:
            info.forwards[channel.forward] += 1
            transport = cast("TunnelTransport", channel.session)
            if transport not in self._metered:
                info.meter.tick(now)  # (its rates count from now, not from its last tick)
                self._metered[transport] = None

    def channel_closed(self, channel: ChannelStream) -> None:
        opened_at = self._opened_at.pop(channel, None)
        if opened_at is not None:
            self.closed_bytes_sent += channel.bytes_sent
            self.closed_bytes_received += channel.bytes_received
            if self.access_log is not None:
                self._log_access(channel, trio.current_time() - opened_at)
        rate = self._rates.pop(channel, None)
        info = self._session_of(channel)
        if info is not None and info.agent is not None and opened_at is not None:
            self.agent_closed_bytes[info.agent, "down"] += channel.bytes_sent
            self.agent_closed_bytes[info.agent, "up"] += channel.bytes_received
        if info is not None:  # what the sampler has not counted yet, for the session
            sent, received = (rate.sent, rate.received) if rate else (0, 0)
            info.meter.add(channel.bytes_sent - sent, channel.bytes_received - received)

    def _session_of(self, channel: ChannelStream) -> SessionInfo | None:
        return self.session_info.get(cast("TunnelTransport", channel.session))

    def channel_reset(self, channel: ChannelStream, code: int, text: str) -> None:
        if self.access_log is not None and channel in self._opened_at:
            self.access_log.channel_reset(channel, code, text)

    def channel_carried(self, channel: ChannelStream, sock: Any) -> None:
        """Told by the roles: ``sock`` (a socket, or None) carries ``channel`` here; the
        access log names its other end (the client, or the address dialled)."""
        if self.access_log is not None and channel in self._opened_at:
            self.access_log.channel_carried(channel, sock)

    def _log_access(self, channel: ChannelStream, duration: float) -> None:
        assert self.access_log is not None
        info = self.session_info.get(cast("TunnelTransport", channel.session))
        agent, source = (info.agent, info.peer) if info is not None else (None, None)
        self.access_log.channel_closed(channel, duration, agent, source)

    def open_failed(self, reason: int) -> None:
        """The peer refused a channel we opened."""
        self.open_failures[_reason_name(reason)] += 1
        peer = "relay" if self.role == "agent" else "agent"
        self._remember_refusal(Refusal(time.time(), "-", _reason_name(reason), None,
                                       f"refused by the {peer} (its log says why)"))

    # -- refusals, reported by the relay -----------------------------------------------

    def channel_refused(self, transport: TunnelTransport, reason: mux.OpenFailure, text: str,
                        destination: str, *, key: str | None = None,
                        channel: ChannelStream | None = None) -> None:
        """The relay refused a channel of ``transport``: count it, log it in aggregate.

        ``text`` says why. ``key`` groups the log lines and is what a line for
        several refusals says about them: a text that is the same for all of
        them ("max_channels 1024 reached"); by default the reason ("forbidden").
        ``channel``: the refused channel; None for an OPEN refused before it became
        one (the access log writes its line at once then).
        """
        if self.access_log is not None:
            self._log_refusal(transport, reason, text, destination, channel)
        self.open_failures[_reason_name(reason)] += 1
        self._remember_refusal(Refusal(time.time(), transport.name, _reason_name(reason),
                                       destination, text))
        if key is None:
            key = _reason_name(reason).replace("_", " ")
        self.refusals.note(transport, transport.name, key, key, destination, text,
                           trio.current_time())

    def _log_refusal(self, transport: TunnelTransport, reason: mux.OpenFailure, text: str,
                     destination: str, channel: ChannelStream | None) -> None:
        assert self.access_log is not None
        if channel is not None:
            if channel in self._opened_at:
                self.access_log.channel_refused(channel, reason, text)
            return
        info = self.session_info.get(transport)
        agent, source = (info.agent, info.peer) if info is not None else (None, None)
        self.access_log.refused_unopened(agent, source, reason, text, destination)

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
                self._remember_refusal(Refusal(time.time(), transport.name,
                                               reason.name.lower(), None, summary, new))
                self.refusals.note(transport, transport.name, f"multiplexer {reason.name}",
                                   summary, None, summary, now, new)

    def peer_open_refused(self, session: object, reason: int) -> None:
        """Logged by the next ``sample`` (or the next OPEN the relay admits), counted
        with the session's others: a flood of refused OPENs is one line a second."""
        self._mux_refusing[cast("TunnelTransport", session)] = None

    def _remember_refusal(self, refusal: Refusal) -> None:
        self.recent_refusals.append(refusal)

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
        for channel in self._opened_at:  # (the live channels, without a walk over sessions)
            sent += channel.bytes_sent
            received += channel.bytes_received
        return sent, received

    def sample(self) -> None:
        """Update per-channel rates from the bytes carried since the last call; write
        the refusal counts that are due. Only sessions with channels (or just without)
        are metered: the relay samples every second, and ticking 1,000 idle agents'
        meters each time cost it about half a percent of a core (docs/PERFORMANCE.md,
        "One relay, many agents")."""
        now = trio.current_time()
        refusing, self._mux_refusing = self._mux_refusing, {}
        for transport in refusing:
            self.log_mux_refusals(transport)
        self.refusals.tick(now)
        for transport in list(self._metered):
            info = self.session_info.get(transport)
            if info is None:  # (ended)
                del self._metered[transport]
                continue
            channels = transport.channels
            for channel in channels.values():
                self._sample_channel(channel, info, now)
            meter = info.meter
            meter.tick(now)
            if not channels and not meter.sent_rate and not meter.received_rate:
                del self._metered[transport]  # (rates 0 until its next channel)
        self.history.add(now, time.time(), *self.bytes_carried())
        self.samples_taken += 1

    def _sample_channel(self, channel: ChannelStream, info: SessionInfo, now: float) -> None:
        last = self._rates.get(channel)
        if last is None:
            self._rates[channel] = _Rate(now, channel.bytes_sent, channel.bytes_received)
            info.meter.add(channel.bytes_sent, channel.bytes_received)
        elif now > last.at:
            elapsed = now - last.at
            sent, received = channel.bytes_sent - last.sent, channel.bytes_received - last.received
            info.meter.add(sent, received)
            last.sent_rate, last.received_rate = sent / elapsed, received / elapsed
            last.at, last.sent, last.received = now, channel.bytes_sent, channel.bytes_received

    def channel_age(self, channel: ChannelStream, now: float) -> float:
        """Seconds ``channel`` has been open at trio time ``now`` (0 if not counted)."""
        return now - self._opened_at.get(channel, now)

    def channel_rates(self, channel: ChannelStream) -> tuple[float, float]:
        """(sent, received) bytes per second over the last ``sample`` interval."""
        rate = self._rates.get(channel)
        return (rate.sent_rate, rate.received_rate) if rate else (0.0, 0.0)

    def agent_bytes(self) -> Counter[tuple[str, str]]:
        """Bytes carried per (agent, "down" or "up") on the relay: closed channels and
        live ones (the relay sends what its channels read: down)."""
        totals = Counter(self.agent_closed_bytes)
        for transport, info in self.session_info.items():
            if info.agent is not None:
                for channel in transport.channels.values():
                    if channel in self._opened_at:
                        totals[info.agent, "down"] += channel.bytes_sent
                        totals[info.agent, "up"] += channel.bytes_received
        return totals

    def open_failure_counts(self) -> Counter[str]:
        """Refused opens by reason: reported ones, and those the live sessions'
        multiplexers refused by themselves."""
        counts = Counter(self.open_failures)
        for transport in self.sessions:
            for reason, count in transport.protocol.session.refused_opens.items():
                counts[_reason_name(reason)] += count
        return counts


_MUX_REFUSALS: Final = {
    mux.OpenFailure.GOING_AWAY: "the session is going away (GOAWAY sent or received)",
    mux.OpenFailure.LIMIT_REACHED: "the session's channel limit (max_channels) reached, "
    "answered by the multiplexer",
    mux.OpenFailure.UNSUPPORTED_KIND: "unsupported channel kind",
}


def _is_tls(stream: object) -> bool:
    """TLS on the session's connection, or on the requests of an HTTP transport."""
    return isinstance(stream, (TLSSocketStream, trio.SSLStream)) or getattr(stream, "tls", False)


def _reason_name(reason: int) -> str:
    try:
        return mux.OpenFailure(reason).name.lower()
    except ValueError:
        return "other"
