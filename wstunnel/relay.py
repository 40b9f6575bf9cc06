"""The relay: accepts agents' WebSockets and opens the real TCP connections.

Each agent connection is served by its own task with its own transport, so one
agent's bad frame or slow socket ends or slows only that session. Every OPEN is
checked against the destination policy after DNS resolution (see net/dial.py).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio

from . import mux, ws
from .config import RelayConfig
from .forwarded import client_address
from .net.channel_stream import ChannelStream
from .net.connect import read_request, tune_socket
from .net.dial import DialError, dial
from .net.splice import splice
from .net.transport import TunnelTransport
from .policy import Policy
from .protocol import TunnelProtocol

__all__ = ["run_relay", "Relay"]

log = logging.getLogger("wstunnel.relay")


class Relay:
    """State shared by all sessions of one relay process."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.policy = _policy(config)
        self.sessions: set[TunnelTransport] = set()
        self._idle = trio.Event()
        self._idle.set()
        self.stopping = False

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """One TCP connection: the upgrade, then the session, then close."""
        peer = _peer_name(stream)
        try:
            tune_socket(stream, notsent_lowat=True)
            accepted = await self._handshake(stream, peer)
            if accepted is not None:
                await self._serve_session(stream, *accepted)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("%s: connection lost during the handshake: %s", peer, exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def _handshake(
        self, stream: trio.SocketStream, peer: str
    ) -> tuple[TunnelProtocol, str] | None:
        """The protocol and the client's name for logs, or None when not upgraded."""
        config = self.config
        handshake = ws.ServerHandshake(max_header_size=16384, max_headers=100)
        with trio.move_on_after(config.handshake_timeout):
            request = await read_request(stream, handshake)
            if request is None:
                return None
            if isinstance(request, ws.HandshakeFailed):
                log.info("%s: bad HTTP request (%s)", peer, request.message)
                await stream.send_all(request.response)
                return None
            peer = self._client_name(stream, request, peer)
            answer = self._route(handshake, request, peer)
            if answer is not None:
                await stream.send_all(answer)
                return None
            await stream.send_all(handshake.accept())
            protocol = TunnelProtocol(
                mux.Role.RELAY,
                trailing_data=handshake.trailing_data,
                max_message_size=config.max_message_size,
                initial_window=config.initial_window,
                max_chunk_size=config.max_chunk_size,
                max_channels=config.max_channels,
            )
            return protocol, peer
        log.info(
            "%s: no complete upgrade request within %g s; dropped", peer, config.handshake_timeout
        )
        return None

    def _client_name(
        self, stream: trio.SocketStream, request: ws.RequestReceived, peer: str
    ) -> str:
        """``peer``, or ``client via peer`` when trusted proxies vouch for X-Forwarded-For."""
        forwarded_for = request.header("x-forwarded-for")
        if forwarded_for is None:
            return peer
        host = _peer_host(stream)
        client = client_address(host, forwarded_for, self.config.trusted_proxies)
        if client == host:
            log.debug("%s: X-Forwarded-For %r ignored (peer not in trusted_proxies)",
                      peer, forwarded_for)
            return peer
        return f"{client} via {peer}"

    def _route(
        self, handshake: ws.ServerHandshake, request: ws.RequestReceived, peer: str
    ) -> bytes | None:
        """The HTTP answer for anything that is not a good upgrade, else None."""
        path = request.target.split("?", 1)[0]
        if path == "/health" and not request.is_upgrade:
            return handshake.reject(200, "ok")
        if path != self.config.path:
            return handshake.reject(404, f"nothing here; the tunnel is at {self.config.path}")
        if self.stopping:
            return handshake.reject(503, "the relay is shutting down")
        if not request.is_upgrade or request.upgrade_problem is not None:
            log.info(
                "%s: %s", peer, request.upgrade_problem or "plain HTTP request on the tunnel path"
            )
            return handshake.default_response()
        if ws.SUBPROTOCOL not in request.subprotocols:
            return handshake.reject(
                400, f"this is a wstunnel relay; use subprotocol {ws.SUBPROTOCOL}"
            )
        return None

    async def _serve_session(
        self, stream: trio.SocketStream, protocol: TunnelProtocol, peer: str
    ) -> None:
        config = self.config
        transport = TunnelTransport(
            stream,
            protocol,
            name=peer,
            on_open=self._open_channel,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
        )
        self.sessions.add(transport)
        self._idle = trio.Event()
        log.info("%s: session up", peer)
        try:
            reason = await transport.run()
        finally:
            self.sessions.discard(transport)
            if not self.sessions:
                self._idle.set()
        log.info("%s: session down: %s (%d channels served)", peer, reason, transport.opened_total)

    async def _open_channel(self, transport: TunnelTransport, channel: ChannelStream) -> None:
        """Dial the destination; splice on success, OPEN_FAILED otherwise."""
        host, port = channel.host, channel.port
        protocol = transport.protocol
        try:
            target = await dial(
                host,
                port,
                timeout=self.config.connect_timeout,
                allows=lambda address: self.policy.allows(host, port, address),
            )
        except DialError as exc:
            self._refuse(transport, channel, exc.reason, exc.text)
            return
        try:
            tune_socket(target, notsent_lowat=False)
            protocol.accept_channel(channel.channel_id)
            transport.wake_writer()
            await splice(target, channel)
        finally:
            await trio.aclose_forcefully(target)

    def _refuse(
        self, transport: TunnelTransport, channel: ChannelStream, reason: mux.OpenFailure, text: str
    ) -> None:
        log.warning("%s: refused channel to %s: %s", transport.name, channel.destination, text)
        if transport.is_open and channel.error is None:
            transport.protocol.refuse_channel(channel.channel_id, reason, text)
            transport.wake_writer()

    async def drain(self, timeout: float) -> None:
        """GOAWAY to every session, wait for their channels, then close them."""
        self.stopping = True
        for transport in list(self.sessions):
            transport.go_away("the relay is shutting down")
        with trio.move_on_after(timeout):
            for transport in list(self.sessions):
                await transport.wait_idle()
        async with trio.open_nursery() as nursery:
            for transport in list(self.sessions):
                nursery.start_soon(transport.close, ws.CloseCode.GOING_AWAY, "relay shutting down")


def _policy(config: RelayConfig) -> Policy:
    return Policy(list(config.allow))


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
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_relay(
    config: RelayConfig, *, shutdown: trio.Event, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until ``shutdown`` is set, then drain and return.

    ``task_status.started`` receives the bound (host, port) pairs.
    """
    relay = Relay(config)
    listeners = await trio.open_tcp_listeners(config.listen.port, host=config.listen.host)
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    if not config.allow:
        log.warning("no 'allow' rules: every channel will be refused (add --allow HOST[:PORT])")
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            serve = partial(trio.serve_listeners, handler_nursery=connections)
            await accepting.start(serve, relay.handle_connection, listeners)
            log.info("relay listening on %s, tunnel path %s", _addrs(bound), config.path)
            task_status.started(bound)
            await shutdown.wait()
            accepting.cancel_scope.cancel()
        log.info(
            "relay stopping: draining %d sessions (up to %g s)",
            len(relay.sessions),
            config.drain_timeout,
        )
        await relay.drain(config.drain_timeout)
        connections.cancel_scope.cancel()


def _addrs(bound: list[tuple[str, int]]) -> str:
    return ", ".join(f"{h}:{p}" for h, p in bound)
