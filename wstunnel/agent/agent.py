"""The agent: local listeners whose connections ride one session to the relay.

Theory of operation: the listeners (bound by ``run_agent``, run.py) live for
the whole run; the session comes and goes. ``maintain_session`` connects,
serves the session until it ends, then reconnects with exponential backoff
and jitter (reconnect.py: which relay, and when); at the relay's GOAWAY it
connects again at once, and the old session drains beside the new one (its
open channels finish there; session_slot.py). The local connections, which
outlive sessions, are carried by the agent's ``Carrier`` (carrying.py), the
``ChannelOpener`` of every forward kind.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Final

import trio

from .. import mux, ws
from ..config import AgentConfig, RelayURL
from ..errors import ConfigError, HandshakeError
from ..net import pump
from ..net.transport import TunnelTransport
from ..protocol import SessionLimits, TunnelProtocol
from ..replay import INSTANCE_HEADER, RESUMABLE_HEADER, RESUME_HEADER, Instance, parse_ticket
from ..security.auth import load_token
from ..service.metrics import TunnelStats
from .carrying import Carrier
from .connect import check_tls_files, failure_reason, refusal_message, refused_on_purpose
from .proxy import proxy_dialer, proxy_environment
from .rate_limits import ForwardLimits
from .reconnect import Reconnect
from .resume import AgentResumer
from .reverse import ReverseForwards
from .session_slot import SessionSlot
from .transports import Opened, TransportChooser
from .transports import Request as TransportRequest

#: Channels one agent session may hold. The relay's ``max_channels`` is the
#: limit that matters (it refuses, and logs, past it); the agent only caps the
#: same id range the relay's setting allows, instead of the sans-IO default of
#: 1024, which is below what a busy relay may be configured to carry.
MAX_CHANNELS: Final = 65536

__all__ = ["Agent", "session_limits"]

log = logging.getLogger("wstunnel.agent")


class Agent:
    """Keeps one agent's session to a relay up; its ``carrier`` carries connections."""

    def __init__(self, config: AgentConfig, stats: TunnelStats | None = None) -> None:
        self.config = config
        self.stats = stats or TunnelStats("agent")
        self.relay: RelayURL = config.relay_url
        self.limits = session_limits(config)
        self.dial = proxy_dialer(config, proxy_environment())
        self.sessions = SessionSlot()  # (the current one, and those draining: session_slot.py)
        self.stopping = False
        #: The ChannelOpener of every forward kind (carrying.py)
        self.carrier = Carrier(lambda: self.config, self.sessions, self.stats,
                               lambda: self.stopping)
        self.reverse = ReverseForwards(config.forwards, self.carrier.tracked)
        #: A new session a relay gave instead of a resume, for the next ``_connect``.
        self._fresh: tuple[RelayURL, Opened] | None = None
        #: Sessions' finished channels still writing their last bytes (drain waits).
        self.last_bytes = pump.LastBytes()
        #: Which process of which agent this is, sent on every connect (the daemon's:
        #: run.py; none for --stdio): agent/resume.py ``this_instance``.
        self.instance: Instance | None = None
        self.stats.reverse_forwards = self.reverse.status
        for forward in config.forwards:  # (each forward's series exists from the start)
            self.stats.forward_channels[forward.label] += 0
        self.token = self._load_token()
        self.transports = TransportChooser()  # (remembers per relay what passed)
        self._reconnect = Reconnect(lambda: self.config)  # (per relay: reconnect.py)
        self.forward_limits = ForwardLimits(self.stats.forward_buckets)  # (rate_limits.py)
        if self.relay.secure:
            check_tls_files(config)

    def _load_token(self) -> str | None:
        config = self.config
        return load_token(token_file=config.token_file, token_env=config.token_env,
                          token_credential=config.token_credential)

    def _refresh_token(self) -> None:
        """Re-read the token before each connect, so a rotated token is picked up."""
        try:
            self.token = self._load_token()
        except ConfigError as exc:
            log.warning("cannot re-read the token (%s); using the one read before", exc)

    # -- the session ----------------------------------------------------------

    async def maintain_session(self) -> None:
        """Keep one session up until cancelled, reconnecting with backoff. With several
        relays, the first one that is not backing off is tried (the first listed is
        preferred), each relay with a backoff of its own (reconnect.py)."""
        reconnect = self._reconnect
        if self.dial is not None:
            log.info("reaching the relay through the proxy %s", self.dial)
        async with trio.open_nursery() as draining:  # (sessions whose relay goes away)
            self.carrier.reopening = draining  # (and connections they refused: _reopener)
            while not self.stopping:
                self.relay = await reconnect.choose()
                try:
                    transport = await self._connect()
                except (OSError, HandshakeError, trio.TooSlowError,
                        trio.BrokenResourceError) as exc:
                    self._connect_failed(reconnect, exc)
                    continue
                reconnect.connected(self.relay)
                started = trio.current_time()
                reason = await self._serve(transport, draining)
                if self.stopping:
                    return
                self.stats.reconnects += 1
                # (a session that did not last backs off: no loop of GOAWAYs at once)
                delay = reconnect.session_ended(self.relay, trio.current_time() - started,
                                                goaway=reason is None)
                if reason is None:  # (GOAWAY: it drains on its own beside the next one)
                    log.info("session to %s: the relay is going away; its open channels "
                             "finish on it, new connections go to a new session in %.1f s",
                             self.relay.url, delay)
                    continue
                log.warning("session to %s down: %s; reconnecting in %.1f s", self.relay.url,
                            reason, delay)

    def _connect_failed(self, reconnect: Reconnect, exc: BaseException) -> None:
        if getattr(exc, "status", None) in (401, 403):
            self.stats.auth_failures += 1
        refused = refused_on_purpose(exc)
        count, delay = reconnect.connect_failed(self.relay, refused)
        if refused:
            log.error("%s", refusal_message(exc, self.relay, self.config, self.token))
        log.warning("cannot reach relay %s (attempt %d): %s; %s", self.relay.url, count,
                    failure_reason(exc), reconnect.next_step(delay))

    async def connect_once(self) -> TunnelTransport:
        """One connection attempt, no retry: for callers that give up instead of
        waiting for the relay (``--stdio``, agent/stdio.py); serve it with ``serve``."""
        return await self._connect()

    async def serve(self, transport: TunnelTransport) -> str:
        """Make ``transport`` the current session and serve it; return why it ended."""
        reason = await self._serve(transport)
        assert reason is not None  # (no draining nursery: it runs to its end)
        return reason

    def connect_failure(self, exc: BaseException) -> tuple[str, bool]:
        """(what went wrong and what to check, whether a retry might help) for a
        failed ``connect_once``."""
        if refused_on_purpose(exc):
            return refusal_message(exc, self.relay, self.config, self.token), False
        return failure_reason(exc), True

    async def _connect(self) -> TunnelTransport:
        relay, opened = self.relay, await self._fresh_from(self.relay)
        if opened is None:
            opened = await self._open([(RESUME_HEADER, "new")])
        protocol = TunnelProtocol(mux.Role.AGENT, limits=self.limits, framed=opened.framed)
        self.forward_limits.pace(protocol, self.config.forwards, trio.current_time())
        resumer = None
        ticket = parse_ticket(opened.headers.get(RESUMABLE_HEADER.lower(), ""))
        if ticket is not None:  # (the relay keeps the session when the connection breaks)
            protocol.enable_resume()  # (before the first record in: every one is counted)
            resumer = AgentResumer(ticket, partial(self._open, relay=relay),
                                   partial(self._take_fresh, relay))
        if opened.trailing:
            protocol.receive_data(opened.trailing)
        config = self.config
        transport = TunnelTransport(
            opened.stream,
            protocol,
            name=self.relay.url,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            observer=self.stats,
            open_now=self.reverse.open_now,
            resumer=resumer,
        )
        transport.last_bytes = self.last_bytes
        return transport

    async def _open(self, extra: list[tuple[str, str]], only: str | None = None, *,
                    relay: RelayURL | None = None) -> Opened:
        """A connection to ``relay`` (by default the one chosen now; a session's resume
        goes to its own): by the configured transport (WebSocket, or the HTTP
        transports where it cannot pass: transports.py), or by ``only``."""
        config = self.config
        relay = relay or self.relay
        self._refresh_token()
        headers = [("Authorization", f"Bearer {self.token}")] if self.token else []
        if self.instance is not None:
            headers.append((INSTANCE_HEADER, str(self.instance)))
        context = None
        if relay.secure:
            from ..security import tls

            settings = config.client_tls
            context = tls.client_context(settings)
            if settings.mode is tls.VerifyMode.INSECURE:
                log.warning("insecure_skip_verify: NOT checking the relay's certificate; "
                            "anyone on the path can read and change this session")
        request = TransportRequest(config, relay, self.dial,
                                   [*config.headers, *headers, *extra], context)
        return await self.transports.open(request, only=only)

    async def _take_fresh(self, relay: RelayURL, opened: Opened) -> bool:
        """A relay answered a resume with a new session: the next ``_connect`` to it uses
        it (a dead one fails that connect, which is retried). Not wanted (False: the
        caller closes it) while another session is up: a draining session's resume."""
        current = self.sessions.current
        if current is not None and not current.resuming:
            return False
        earlier, self._fresh = self._fresh, (relay, opened)
        if earlier is not None:  # (not used: the newer one goes)
            await trio.aclose_forcefully(earlier[1].stream)
        return True

    async def discard_fresh(self) -> None:
        """Close the new session a resume got that no ``_connect`` took (the agent stops:
        it would be left to the garbage collector, its relay holding it meanwhile)."""
        fresh, self._fresh = self._fresh, None
        if fresh is not None:
            await trio.aclose_forcefully(fresh[1].stream)

    async def _fresh_from(self, relay: RelayURL) -> Opened | None:
        """The new session a resume got from ``relay``, if any; one from another relay is
        closed (the next session goes where ``reconnect.py`` chose)."""
        fresh, self._fresh = self._fresh, None
        if fresh is None:
            return None
        if fresh[0] == relay:
            return fresh[1]
        await trio.aclose_forcefully(fresh[1].stream)
        return None

    async def _serve(self, transport: TunnelTransport,
                     draining: trio.Nursery | None = None) -> str | None:
        """Make ``transport`` the current session and serve it; why it ended. With
        ``draining``, return None at the relay's GOAWAY instead: the session goes on
        there until its channels are done, and the next one may start at once (a
        relay behind a balancer is stopping; another takes new connections)."""
        self.stats.session_started(transport)
        log.info("session up to %s", self.relay.url)
        if draining is not None:
            return await self.sessions.serve(transport, self._run_session, draining)
        self.sessions.fill(transport)
        return await self._run_session(transport)

    async def _run_session(self, transport: TunnelTransport) -> str:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.reverse.hold, transport)  # (a reload may add -R)
                if self.relay != self.config.relay_urls[0]:
                    nursery.start_soon(self._reconnect.back_to_preferred, transport,
                                       lambda: self.carrier.open_connections == 0,
                                       lambda: self.dial)
                reason = await transport.run()
                nursery.cancel_scope.cancel()
            return reason
        finally:
            self.stats.session_ended(transport)
            self.sessions.vacate(transport)
            await trio.aclose_forcefully(transport.stream)

    @property
    def open_connections(self) -> int:
        """Local connections being carried (or waiting for a session) now."""
        return self.carrier.open_connections

    async def drain(self, timeout: float) -> None:
        """GOAWAY, let open channels finish up to ``timeout``, close the session."""
        self.stopping = True
        self.reverse.release_all()
        session = self.sessions.current
        if session is not None:
            session.go_away("the agent is shutting down")
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline):
            await self.carrier.wait_idle()
            # A connection done here may still have data queued for the relay: a close
            # now would drop it, and the relay reset the destination.
            for session in self.sessions.all():
                await session.wait_idle()
        for session in self.sessions.all():
            await session.close(ws.CloseCode.GOING_AWAY, "agent shutting down")
        with trio.move_on_at(deadline):  # (a slow local reader's last bytes of a download)
            await self.last_bytes.wait()


def session_limits(config: AgentConfig) -> SessionLimits:
    """The limits of the agent's sessions (built per load or reload)."""
    return SessionLimits(initial_window=config.initial_window,
                         max_chunk_size=config.max_chunk_size,
                         max_send_window=config.max_send_window,
                         max_queued_size=config.max_queued_size, max_channels=MAX_CHANNELS)

