"""The agent: local listeners whose connections ride one session to the relay.

Theory of operation: the listeners (bound by ``run_agent``, run.py) live for
the whole run; the session comes and goes. ``maintain_session`` connects,
serves the session until it ends, then reconnects with exponential backoff
and jitter; at the relay's GOAWAY it connects again at once, and the old
session drains beside the new one (its open channels finish there;
session_slot.py). The agent is the ``ChannelOpener`` of every forward kind
(kinds.py): a local connection opens a channel on the session (its first
bytes travel right behind the OPEN) and is handed to the session's socket
pump (net/pump.py; no task per connection from then on), at once in the
accepting task when a session is up (``carry_now``), else from a task that
waits up to ``connect_wait_timeout`` for one (``carry``), and is spliced
until both sides finish where there is no pump. When the session drops, its
channels break and their local sockets are closed, never left hanging. A
channel its relay refused because it was going away (the OPEN crossed the
GOAWAY) is opened again on the next session, its socket moved over from the
pump (``_reopener``) or spliced again, with the bytes it had sent (reopen.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import Final

import trio

from .. import mux, ws
from ..config import AgentConfig, RelayURL
from ..errors import ChannelRefused, ConfigError, HandshakeError, SessionClosed
from ..net.channel_stream import ChannelStream
from ..net.ending import abort_stream
from ..net.splice import close_spliced, splice
from ..net.transport import TunnelTransport
from ..protocol import SessionLimits, TunnelProtocol
from ..replay import RESUMABLE_HEADER, RESUME_HEADER, parse_ticket
from ..security.auth import load_token
from ..service.metrics import TunnelStats
from .connect import check_tls_files, failure_reason, refusal_message, refused_on_purpose
from .proxy import proxy_dialer, proxy_environment
from .rate_limits import ForwardLimits
from .reconnect import Reconnect
from .reopen import reopen
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
    """Session management and local connection handling for one agent."""

    def __init__(self, config: AgentConfig, stats: TunnelStats | None = None) -> None:
        self.config = config
        self.stats = stats or TunnelStats("agent")
        self.relay: RelayURL = config.relay_url
        self.limits = session_limits(config)
        self.dial = proxy_dialer(config, proxy_environment())
        self.sessions = SessionSlot()  # (the current one, and those draining: session_slot.py)
        self.stopping = False
        self._channels = 0
        self._idle = trio.Event()
        self._idle.set()
        #: Where a pumped connection refused with GOING_AWAY is opened again (``_reopener``);
        #: None outside ``maintain_session`` (``--stdio`` retries on its own: stdio.py).
        self._reopening: trio.Nursery | None = None
        self.reverse = ReverseForwards(config.forwards, self._tracked)
        self._fresh: Opened | None = None
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
            self._reopening = draining  # (and connections they refused: _reopener)
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
                delay = reconnect.session_ended(self.relay, trio.current_time() - started)
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
        fresh, self._fresh = self._fresh, None  # (the relay gave it instead of a resume)
        opened = fresh or await self._open([(RESUME_HEADER, "new")])
        protocol = TunnelProtocol(mux.Role.AGENT, limits=self.limits, framed=opened.framed)
        self.forward_limits.pace(protocol, self.config.forwards, trio.current_time())
        resumer = None
        ticket = parse_ticket(opened.headers.get(RESUMABLE_HEADER.lower(), ""))
        if ticket is not None:  # (the relay keeps the session when the connection breaks)
            protocol.enable_resume()  # (before the first record in: every one is counted)
            resumer = AgentResumer(ticket, self._open, self._take_fresh)
        if opened.trailing:
            protocol.receive_data(opened.trailing)
        config = self.config
        return TunnelTransport(
            opened.stream,
            protocol,
            name=self.relay.url,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            observer=self.stats,
            open_now=self.reverse.open_now,
            resumer=resumer,
        )

    async def _open(self, extra: list[tuple[str, str]], only: str | None = None) -> Opened:
        """A connection to the relay: by the configured transport (WebSocket, or the
        HTTP transports where it cannot pass: transports.py), or by ``only``."""
        config = self.config
        self._refresh_token()
        headers = [("Authorization", f"Bearer {self.token}")] if self.token else []
        context = None
        if self.relay.secure:
            from ..security import tls

            settings = config.client_tls
            context = tls.client_context(settings)
            if settings.mode is tls.VerifyMode.INSECURE:
                log.warning("insecure_skip_verify: NOT checking the relay's certificate; "
                            "anyone on the path can read and change this session")
        request = TransportRequest(config, self.relay, self.dial,
                                   [*config.headers, *headers, *extra], context)
        return await self.transports.open(request, only=only)

    def _take_fresh(self, opened: Opened) -> None:
        """The relay answered a resume with a new session: the next ``_connect`` uses it
        (a draining session's resume may leave one here; a dead one fails that connect,
        which is retried)."""
        self._fresh = opened

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
                                       lambda: self._channels == 0, lambda: self.dial)
                reason = await transport.run()
                nursery.cancel_scope.cancel()
            return reason
        finally:
            self.stats.session_ended(transport)
            self.sessions.vacate(transport)
            await trio.aclose_forcefully(transport.stream)

    # -- local connections ---------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Local connections being carried (or waiting for a session) now."""
        return self._channels

    # -- ChannelOpener (kinds.py): what every forward kind opens channels with --------

    def carry_now(self, host: str, port: int, sock: socket.socket, *,
                  kind: int = mux.ChannelKind.TCP, forward: str | None = None) -> bool:
        """Open a channel and hand ``sock`` to the session's socket pump at once, with
        no task, when the session is up and has a pump; True when done. Its first
        bytes, if already here, go out in the same write as the OPEN.

        False (nothing changed): no usable session, no pump, or the open failed;
        ``carry`` then deals with it (waits for a session, splices, logs).
        """
        session = self.sessions.usable_now()
        if session is None:
            return False  # (e.g. resuming: ``carry`` waits up to connect_wait_timeout)
        try:
            channel = session.open_channel(host, port, kind=kind, forward=forward)
        except (SessionClosed, ChannelRefused):
            return False
        self._connection_opened()  # (the accept loop has set TCP_NODELAY)
        finished = partial(self._channel_finished, channel.destination, channel)
        self.stats.channel_carried(channel, sock)  # (the access log's source address)
        session.attach_socket(sock, channel, finished, read_now=True,
                              reopen=self._reopener(channel))
        return True

    async def carry(self, host: str, port: int, stream: trio.abc.HalfCloseableStream, *,
                    kind: int = mux.ChannelKind.TCP, forward: str | None = None) -> None:
        """One local connection, carried as one channel; closes ``stream`` unless the
        session's socket pump took it over."""
        self._connection_opened()
        handed_over = False
        try:  # (the accept loop has tuned the socket)
            handed_over = await self._carry(host, port, stream, kind, forward)
        finally:
            if not handed_over:  # (closed by now, unless cancelled: that is a failure)
                await abort_stream(stream)
                self._connection_closed()

    def _tracked(self) -> Callable[[], None]:
        """Count a connection carried for a reverse forward; returns its "finished"."""
        self._connection_opened()
        return self._connection_closed

    def _connection_opened(self) -> None:
        self._channels += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def _connection_closed(self) -> None:
        self._channels -= 1
        if self._channels == 0:
            self._idle.set()

    async def _carry(self, host: str, port: int, stream: trio.abc.HalfCloseableStream,
                     kind: int, forward: str | None) -> bool:
        """Carry ``stream``; True when the session's socket pump took it over (and will
        close it), False when it is finished here (``carry`` closes it)."""
        target = _target_text(host, port, kind)
        session = await self.sessions.wait(self.config.connect_wait_timeout)
        if session is None:
            log.warning("no session to the relay within %g s; reset the connection for %s",
                        self.config.connect_wait_timeout, target)
            return False
        try:
            channel = session.open_channel(host, port, kind=kind, forward=forward)
        except (SessionClosed, ChannelRefused) as exc:
            log.warning("cannot open a channel to %s: %s; reset the connection", target, exc)
            return False
        return await self._carry_opened(session, channel, stream)

    async def open_channel(self, host: str, port: int, *, kind: int = mux.ChannelKind.TCP,
                           forward: str | None = None) -> ChannelStream | None:
        """Wait for a session (up to ``connect_wait_timeout``) and open a channel of
        ``kind`` to host:port on it, for a kind that answers its client first
        (kinds.py); None: no session, or it could not open one (logged)."""
        target = _target_text(host, port, kind)
        session = await self.sessions.wait(self.config.connect_wait_timeout)
        if session is None:
            log.warning("no session to the relay within %g s; cannot open %s",
                        self.config.connect_wait_timeout, target)
            return None
        try:
            return session.open_channel(host, port, kind=kind, forward=forward)
        except (SessionClosed, ChannelRefused) as exc:
            log.warning("cannot open a channel to %s: %s", target, exc)
            return None

    async def carry_channel(self, channel: ChannelStream,
                            stream: trio.abc.HalfCloseableStream) -> None:
        """``carry`` over a channel ``open_channel`` opened; owns ``stream``."""
        self._connection_opened()
        handed_over = False
        try:
            session = self.sessions.current
            if session is not None and session.channels.get(channel.channel_id) is not channel:
                session = None  # (its session ended: the channel is broken, splice ends it)
            handed_over = await self._carry_opened(session, channel, stream)
        finally:
            if not handed_over:
                await abort_stream(stream)
                self._connection_closed()

    async def _carry_opened(self, session: TunnelTransport | None, channel: ChannelStream,
                            stream: trio.abc.HalfCloseableStream) -> bool:
        while True:
            target = channel.destination
            finished = partial(self._channel_finished, target, channel)
            self.stats.channel_carried(channel, getattr(stream, "socket", None))  # (access log)
            if session is not None and session.attach(stream, channel, finished,
                                                      reopen=self._reopener(channel)):
                return True
            clean = await splice(stream, channel)
            again = await self._reopen(channel) if channel.retry is not None else None
            if again is None:
                break
            session, channel = again
        self._channel_finished(target, channel, closed=False)
        await close_spliced(stream, channel, clean)
        return False

    # -- a channel refused with GOING_AWAY: opened again on the next session ----------

    def _reopener(self, channel: ChannelStream) -> Callable[[socket.socket], None] | None:
        """For the socket pump (``attach``): where ``channel``'s socket goes if the relay
        refuses it with GOING_AWAY (``_carry_again``, in a task of its own)."""
        nursery = self._reopening
        if nursery is None:
            return None
        return lambda sock: nursery.start_soon(self._carry_again, sock, channel)

    async def _carry_again(self, sock: socket.socket, refused: ChannelStream) -> None:
        """Carry a pumped connection whose channel ``refused`` was refused with
        GOING_AWAY on the next session; reset it if none comes in time (as ``carry``)."""
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        handed_over = False
        try:
            again = await self._reopen(refused)
            if again is not None:
                handed_over = await self._carry_opened(*again, stream)
        finally:
            if not handed_over:
                await abort_stream(stream)
                self._connection_closed()

    async def _reopen(self, refused: ChannelStream
                      ) -> tuple[TunnelTransport, ChannelStream] | None:
        """``refused`` crossed its relay's GOAWAY: open it again on the next session,
        with what it had taken (reopen.py); None, logged: reset the connection."""
        return await reopen(refused, self.sessions, self.config.connect_wait_timeout,
                            lambda: self.stopping)

    def _channel_finished(
        self, target: str, channel: ChannelStream, *, closed: bool = True
    ) -> None:
        error = channel.error
        if isinstance(error, ChannelRefused):
            log.warning("relay could not connect to %s: %s", target, error)
        elif error is not None:
            log.info("channel to %s ended: %s", target, error)
        if closed:
            self._connection_closed()

    async def drain(self, timeout: float) -> None:
        """GOAWAY, let open channels finish up to ``timeout``, close the session."""
        self.stopping = True
        self.reverse.release_all()
        session = self.sessions.current
        if session is not None:
            session.go_away("the agent is shutting down")
        with trio.move_on_after(timeout):
            await self._idle.wait()
        for session in self.sessions.all():
            await session.close(ws.CloseCode.GOING_AWAY, "agent shutting down")


def _target_text(host: str, port: int, kind: int) -> str:
    """``host:port``, or ``unix:/path`` for a unix socket target, as logs say it."""
    return f"unix:{host}" if kind == mux.ChannelKind.UNIX else f"{host}:{port}"


def session_limits(config: AgentConfig) -> SessionLimits:
    """The limits of the agent's sessions (built per load or reload)."""
    return SessionLimits(initial_window=config.initial_window,
                         max_chunk_size=config.max_chunk_size,
                         max_send_window=config.max_send_window,
                         max_queued_size=config.max_queued_size, max_channels=MAX_CHANNELS)

