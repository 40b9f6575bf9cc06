"""The relay: accepts agents' WebSockets and opens the real TCP connections.

Each agent connection is served by its own task with its own transport, so one
agent's bad frame or slow socket ends or slows only that session. Every OPEN is
checked against the destination policy after DNS resolution (see dial.py).
An admitted OPEN has one path (``_open_now``): its kind's ``Connector`` turns
it into a connected socket, at once where it can (an IP literal: no task, so
the OPEN_OK and the early data leave at once) or in a task; then the channel
is accepted and its socket handed to the session's socket pump (``_carry``).
TLS, authentication and per-session limits live in guard.py: the TLS
handshake, the upgrade request and the login all run under one
``handshake_timeout``; each session gets the allow rules of its agent.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final

import trio

from .. import mux, ws
from ..addresses import join_host_port
from ..config import RelayConfig
from ..net import pump
from ..net.channel_stream import ChannelStream
from ..net.ending import set_abortive
from ..net.keepalive import KeepaliveTimer
from ..net.resumption import NewCarrier
from ..net.sockopts import tune_plain_socket, tune_socket
from ..net.splice import splice_to_end
from ..net.transport import TunnelTransport
from ..protocol import TunnelProtocol
from ..replay import (
    INSTANCE_HEADER,
    RESUMABLE_HEADER,
    RESUME_HEADER,
    RESUMED_HEADER,
    parse_instance,
    parse_resume,
)
from ..service.metrics import TunnelStats
from ..service.open_files import pending_handshakes_limit
from . import rate_limits
from .dial import Connecting, Connector, DialError, TcpConnector
from .dial_udp import UdpConnector, carry_flow
from .dial_unix import UnixConnector
from .door import (
    Accepted,
    Answer,
    LogLine,
    NeedsLogin,
    Seat,
    Visitor,
    resuming,
    server_handshake,
)
from .guard import Gatekeeper, Identity, SessionGuard
from .handshakes import Pending, PendingHandshakes
from .http_front import HttpFront
from .resume import Admission, Held, HeldSessions, RelayResumer
from .reverse import LISTEN_KINDS, ReverseListeners
from .upgrade import HttpRequest, client_gave_up, read_request, send_refusal

__all__ = ["Relay", "CLOSE_IDLE"]

log = logging.getLogger("wstunnel.relay")

CLOSE_IDLE: Final = 4000  # private-use close code: the session had no channel for idle_timeout
_GOING_AWAY: Final = "the relay is shutting down"  # (GOAWAY's text while it drains)

#: What is left to do for an OPEN, to run in a task of its own.
Rest = Callable[[], Awaitable[None]]


class Relay:
    """State shared by all sessions of one relay process."""

    def __init__(self, config: RelayConfig, stats: TunnelStats | None = None) -> None:
        self.config = config
        self.stats = stats or TunnelStats("relay")
        self.sessions: set[TunnelTransport] = set()
        self.stopping = False
        self.gate = Gatekeeper(config)
        #: Turn admitted OPENs into connected sockets, one per connect kind; an OPEN
        #: of another kind is refused (UNSUPPORTED_KIND).
        self.connectors: dict[int, Connector] = {mux.ChannelKind.TCP: TcpConnector(),
                                                 mux.ChannelKind.UNIX: UnixConnector(),
                                                 mux.ChannelKind.UDP: UdpConnector()}
        #: The listeners agents' reverse forwards asked for (reverse.py).
        self.reverse = ReverseListeners()
        self.stats.reverse_forwards = self.reverse.status
        #: Sessions over the HTTP transports, where a WebSocket cannot pass (http_front.py).
        self.http = HttpFront(self)
        #: Resumable sessions, by id (resume.py).
        self.held = HeldSessions()
        #: Every session's keepalive checks, from one task (``run_relay`` runs it; a
        #: session finds it not running and runs a timer of its own).
        self.keepalive = KeepaliveTimer()
        #: Sessions' finished channels still writing their last bytes (drain waits).
        self.last_bytes = pump.LastBytes()
        #: Connections not yet let in by a login: the oldest is closed past the limit.
        self.handshakes = PendingHandshakes(
            pending_handshakes_limit(config.max_pending_handshakes), self.stats)

    async def handle_connection(self, tcp: trio.SocketStream) -> None:
        """One TCP connection: TLS, the upgrade and login, then the session, then close.

        The connection's ``seat`` is its place among its agent's sessions once a login
        takes one (door.py): given back when its session ends or, whatever happens
        before that, when the connection does."""
        peer = _peer_name(tcp)
        peer_host = _peer_host(tcp)  # (TLS takes the socket over)
        stream: trio.abc.Stream = tcp
        seat = Seat()
        try:
            tune_socket(tcp, notsent_lowat=True)
            accepted = None
            with self.handshakes.enter(peer) as pending:  # (until a login lets it in)
                with trio.move_on_after(self.config.handshake_timeout):
                    stream, cert_name = await self.gate.secure(tcp)
                    accepted = await self._handshake(
                        stream, Visitor(peer, peer_host, cert_name), seat, pending)
                    if accepted is None:
                        return
                if isinstance(accepted, Answer):  # (its linger is not the handshake's time)
                    await send_refusal(stream, accepted.response)
                    return
            if pending.evicted:  # closed to make room for a newer one (logged there)
                return
            if accepted is None:
                log.info("%s: no complete upgrade request within %g s; dropped",
                         peer, self.config.handshake_timeout)
                return
            if isinstance(accepted, trio.Event):  # a resumed session's new carrier
                await accepted.wait()  # (the session carries on over this connection)
                return
            if isinstance(accepted[0], HttpRequest):  # the HTTP transports (http_front.py)
                await self.http.serve(accepted[0], accepted[1], accepted[2])
                return
            await self._serve_session(stream, *accepted, seat=seat)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, ssl.SSLError):
                log.info("%s: TLS handshake failed: %s", peer, cause)
            else:
                log.debug("%s: connection lost during the handshake: %s", peer, cause)
        except Exception:  # (as net/pump.py per socket: one connection's bug ends it alone)
            log.error("%s: unexpected error serving this connection (a bug; please report it "
                      "with this traceback); it is closed, the relay serves on", peer,
                      exc_info=True)
        finally:
            seat.release()
            await trio.aclose_forcefully(stream)

    async def _handshake(
        self, stream: trio.abc.Stream, visitor: Visitor, seat: Seat, pending: Pending
    ) -> (tuple[TunnelProtocol, Identity, str, Held | None]
          | tuple[HttpRequest, Accepted, Visitor] | trio.Event | Answer | None):
        """The protocol, the agent, the client's name for logs and, for a resumable
        session, its entry in ``held``; or an HTTP-transport request let in, for
        ``self.http``; or, for a resume, the event that ends this connection's part;
        the answer to send when refused; None when the client went away (or was
        closed to make room, ``pending``: until its login lets it in, it may be).

        The decisions are the door's (door.py); this reads, waits and writes.
        """
        handshake = server_handshake()
        # (the caller bounds all of this with handshake_timeout)
        request = await read_request(stream, handshake)
        if request is None:
            return None
        http = request if isinstance(request, HttpRequest) else None
        outcome = await self.login(
            handshake, request.request if isinstance(request, HttpRequest) else request, visitor,
            seat)
        if isinstance(outcome, Answer):
            return outcome
        if not pending.admit():
            return None
        if http is not None:
            return http, outcome, visitor
        assert isinstance(request, ws.RequestReceived)  # (a failed one got an Answer)
        return await self._start_or_resume(stream, handshake, request, outcome)

    async def _start_or_resume(
        self, stream: trio.abc.Stream, handshake: ws.ServerHandshake,
        request: ws.RequestReceived, accepted: Accepted,
    ) -> tuple[TunnelProtocol, Identity, str, Held | None] | trio.Event | Answer | None:
        """A new session (resumable if the agent asks and ``resume_grace`` allows), or
        the next carrier of a held one (resume.py); None when the client gave up."""
        if client_gave_up(stream, accepted.peer):
            return None
        admission = await self.admit_resume(request, accepted)
        if admission.refused is not None:  # not this agent's: exactly a bad login's answer
            return self.refuse_session(handshake, accepted, admission.refused)
        if admission.resumes is not None:
            await stream.send_all(handshake.accept(admission.headers))
            return self.held.deliver(admission.resumes, NewCarrier(
                stream, handshake.trailing_data, admission.peer_received, framed=False))
        refusal = self.refuse_new_session(handshake, request, accepted, admission)
        if refusal is not None:
            return refusal
        response, protocol = self.gate.door.start_session(
            handshake, admission.headers, resumable=admission.held is not None)
        try:
            await stream.send_all(response)
        except BaseException:  # (the client is gone: no session will ever drop it)
            if admission.held is not None:
                self.held.drop(admission.held)
            raise
        return protocol, accepted.identity, accepted.peer, admission.held

    async def admit_resume(self, request: ws.RequestReceived,
                           accepted: Accepted) -> Admission:
        """What the agent's X-Wstunnel-Resume asks for, over any transport: resume a
        held session (its old carrier stopped first), refuse (not this agent's, or a
        wrong secret), or a new session, resumable when asked and allowed."""
        identity, admission = accepted.identity, Admission()
        value = request.header(RESUME_HEADER.lower())
        try:
            wanted = parse_resume(value or "")
        except ValueError:
            wanted, value = None, None
        if wanted is not None:
            session_id, secret, peer_received = wanted
            found = self.held.find(session_id, identity.name, secret)
            if isinstance(found, str):
                return Admission(refused=found)
            if (found is not None and found.transport is not None
                    and await found.transport.detach("replaced by the agent's resume")):
                replay = found.transport.protocol.replay
                assert replay is not None  # (the old carrier has stopped: the count is final)
                log.info("%s: agent %s resumes its session (%s)", accepted.peer, identity.name,
                         found.transport.name)
                return Admission(resumes=found, peer_received=peer_received,
                                 headers=[(RESUMED_HEADER, str(replay.received))])
            admission.headers.append((RESUMED_HEADER, "no; the relay does not know that "
                                      "session (it restarted, or resume_grace ran out)"))
        if value is not None and self.config.resume_grace > 0:
            instance = parse_instance(request.header(INSTANCE_HEADER.lower()))
            admission.held = self.held.new(identity.name, self.config.resume_grace, instance)
            admission.headers.append((RESUMABLE_HEADER, str(admission.held.ticket)))
        return admission

    def refuse_new_session(self, handshake: ws.ServerHandshake, request: ws.RequestReceived,
                           accepted: Accepted, admission: Admission) -> Answer | None:
        """A resume the door let past the drain and the session limit that gets a new
        session instead must pass both (any transport): the answer when it does not."""
        if not resuming(request):
            return None
        refusal = self.gate.door.admit_new_session(handshake, accepted,
                                                   stopping=self.stopping)
        if refusal is not None:
            if admission.held is not None:
                self.held.drop(admission.held)
            _log_lines(refusal.log)
        return refusal

    async def login(self, handshake: ws.ServerHandshake,
                    request: ws.RequestReceived | ws.HandshakeFailed,
                    visitor: Visitor, seat: Seat) -> Answer | Accepted:
        """The door's answer to one request (an upgrade, or an HTTP-transport request),
        with a scrypt token checked under the relay's budget; logged and counted. A new
        session takes ``seat``, the connection's (``handle_connection`` gives it back)."""
        outcome = self.gate.door.enter(handshake, request, visitor, now=trio.current_time(),
                                       stopping=self.stopping, seat=seat)
        _log_lines(outcome.log)
        if isinstance(outcome, NeedsLogin):  # a scrypt token: checked under the relay's budget
            outcome = await self.gate.authenticate(handshake, outcome)
            _log_lines(outcome.log)
        if isinstance(outcome, Answer) and outcome.failed_login:
            self.stats.auth_failures += 1
        return outcome

    def start_framed_session(self, *, resumable: bool = False) -> TunnelProtocol:
        """The relay's end of a session over an HTTP transport (http_front.py)."""
        protocol = TunnelProtocol(mux.Role.RELAY, limits=self.gate.door.limits, framed=True)
        if resumable:
            protocol.enable_resume()
        return protocol

    def refuse_session(self, handshake: ws.ServerHandshake, accepted: Accepted,
                       problem: str) -> Answer:
        """A request for an unknown session, or another agent's: a bad login's answer."""
        answer = self.gate.door.refuse_session(handshake, accepted, problem,
                                               now=trio.current_time())
        _log_lines(answer.log)
        self.stats.auth_failures += 1
        return answer

    async def serve_session(self, stream: trio.abc.Stream, protocol: TunnelProtocol,
                            identity: Identity, peer: str, held: Held | None = None, *,
                            seat: Seat) -> None:
        """Run one session over ``stream`` until it ends (http_front.py's sessions)."""
        await self._serve_session(stream, protocol, identity, peer, held, seat=seat)

    async def _serve_session(
        self, stream: trio.abc.Stream, protocol: TunnelProtocol, identity: Identity, peer: str,
        held: Held | None = None, *, seat: Seat,
    ) -> None:
        """Run the session until it ends; its ``seat`` (its place among its agent's
        sessions, taken at login) is given back then, not when the connection closes."""
        config = self.config
        guard = SessionGuard(identity, config)
        rate_limits.pace_session(protocol, identity.name, config, self.stats.agent_buckets,
                                 trio.current_time())
        transport = TunnelTransport(
            stream,
            protocol,
            name=f"{peer} (agent {identity.name})",
            open_now=partial(self._open_now, guard),
            admit=partial(self._admit, guard),
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            observer=self.stats,
            resumer=RelayResumer(held, self.held) if held is not None else None,
            keepalive=self.keepalive,
        )
        transport.last_bytes = self.last_bytes
        if held is not None:
            held.transport = transport
        self.sessions.add(transport)
        if self.stopping:  # (let in before the drain began: it drains too)
            transport.go_away(_GOING_AWAY)
        self.stats.session_started(transport, agent=identity.name, peer=peer)
        log.info("%s: session up for agent %s", peer, identity.name)
        try:
            async with trio.open_nursery() as nursery:
                if config.idle_timeout > 0:
                    nursery.start_soon(self._close_when_idle, transport)
                reason = await transport.run()
                nursery.cancel_scope.cancel()
        finally:
            if held is not None:
                self.held.drop(held)
            seat.release()
            self.stats.session_ended(transport)
            self.sessions.discard(transport)
        log.info("%s: session down: %s (%d channels served)", transport.name, reason,
                 transport.opened_total)

    def _admit(
        self, guard: SessionGuard, transport: TunnelTransport, event: mux.ChannelOpenRequested
    ) -> tuple[mux.OpenFailure, str] | None:
        """Refuse an OPEN past the session's limits (counted, and logged in aggregate)."""
        self.stats.log_mux_refusals(transport)  # OPENs its multiplexer refused, if any
        refusal = guard.admit(len(transport.channels))
        if refusal is not None:
            self.stats.channel_refused(transport, mux.OpenFailure.LIMIT_REACHED, refusal,
                                       join_host_port(event.host, event.port), key=refusal)
            return mux.OpenFailure.LIMIT_REACHED, refusal
        return None

    async def _close_when_idle(self, transport: TunnelTransport) -> None:
        """Close the session once it has had no channel for ``idle_timeout`` (code 4000)."""
        timeout = self.config.idle_timeout
        seen = -1
        while True:
            await trio.sleep(timeout)
            if not transport.channels and transport.opened_total == seen:
                log.info("%s: no channel for %g s; closing the idle session",
                         transport.name, timeout)
                await transport.close(CLOSE_IDLE, "idle timeout")
                return
            seen = transport.opened_total

    def _open_now(
        self, guard: SessionGuard, transport: TunnelTransport, channel: ChannelStream
    ) -> Rest | None:
        """An admitted OPEN, answered where it was read when that needs no waiting;
        returns the rest as a task when there is waiting to do (DNS, a connect still
        in progress, no socket pump). Only those count as opens in flight
        (``max_pending_opens``): the others are answered before the next OPEN is read."""
        if channel.kind in LISTEN_KINDS:
            return self.reverse.request(transport, channel, guard.identity.name,
                                        self.gate.current_listen_policy(guard.identity))
        policy = self.gate.current_policy(guard.identity)
        if policy is None:
            self._refuse(transport, channel, mux.OpenFailure.FORBIDDEN,
                         f"agent {guard.identity.name} is no longer configured on this relay")
            return None
        connector = self.connectors.get(channel.kind)
        if connector is None:
            self._refuse(transport, channel, mux.OpenFailure.UNSUPPORTED_KIND,
                         f"this relay does not open {_kind_name(channel.kind)} channels")
            return None
        try:
            connected = connector.connect(channel.host, channel.port, policy,
                                          timeout=self.config.connect_timeout)
        except DialError as exc:
            self._refuse(transport, channel, exc.reason, exc.text)
            return None
        if isinstance(connected, socket.socket):
            return self._carry(transport, channel, connected)
        guard.pending += 1
        return partial(self._open_later, guard, transport, channel, connected)

    async def _open_later(self, guard: SessionGuard, transport: TunnelTransport,
                          channel: ChannelStream, connecting: Connecting) -> None:
        """The task for an OPEN whose connect needs waiting."""
        try:
            sock = await connecting()
        except DialError as exc:
            self._refuse(transport, channel, exc.reason, exc.text)
            return
        finally:
            guard.pending -= 1
        rest = self._carry(transport, channel, sock)
        if rest is not None:
            await rest()

    def _carry(self, transport: TunnelTransport, channel: ChannelStream,
               sock: socket.socket) -> Rest | None:
        """Accept the channel and hand the connected ``sock`` to the socket pump;
        where there is none, the rest (splice) to run as a task. A UDP flow's
        datagrams have their own carrier, a task per flow (dial_udp.py)."""
        if channel.kind == mux.ChannelKind.UDP:
            rest = carry_flow(transport, channel, sock)
            if rest is not None:
                self.stats.channel_carried(channel, sock)
            return rest
        if channel.kind == mux.ChannelKind.TCP:  # (a unix socket has neither: net/unix_socket.py)
            tune_plain_socket(sock, notsent_lowat=False)
            set_abortive(sock)  # (a clean end clears it: net/ending.py)
        if not transport.accept(channel):
            sock.close()  # the session ended or the agent reset the channel meanwhile
            return None
        self.stats.channel_carried(channel, sock)  # (the access log's dialled address)
        if transport.attach_socket(sock, channel):
            return None  # the pump carries it from here, with no task of its own
        return partial(splice_to_end, trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
                       channel)

    def _refuse(
        self, transport: TunnelTransport, channel: ChannelStream, reason: mux.OpenFailure, text: str
    ) -> None:
        self.stats.channel_refused(transport, reason, text, channel.destination, channel=channel)
        transport.refuse(channel, reason, text)

    async def drain(self, timeout: float) -> None:
        """GOAWAY to every session, wait for their channels, then close them.

        Meanwhile the door lets in only requests for sessions the relay holds:
        a session whose path breaks during the drain is resumed, its channels
        carry on (docs/PROTOCOL.md §12). A session let in just before the drain
        began gets its GOAWAY as it starts (``_serve_session``) and is waited for too.
        """
        self.stopping = True
        self.reverse.release_all("the relay is shutting down")
        for transport in list(self.sessions):
            transport.go_away(_GOING_AWAY)
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline):
            while busy := [transport for transport in self.sessions if transport.channels]:
                await busy[0].wait_idle()
        async with trio.open_nursery() as nursery:
            for transport in list(self.sessions):
                nursery.start_soon(transport.close, ws.CloseCode.GOING_AWAY, "relay shutting down")
        with trio.move_on_at(deadline):  # (a slow destination's last bytes of an upload)
            await self.last_bytes.wait()


def _kind_name(kind: int) -> str:
    try:
        return mux.ChannelKind(kind).name.lower().replace("_", " ")
    except ValueError:
        return f"kind {kind}"


def _log_lines(lines: tuple[LogLine, ...]) -> None:
    for line in lines:
        log.log(line.level, "%s", line.text)


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return ""


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown peer"
    return join_host_port(host, port)
