"""The relay: accepts agents' WebSockets and opens the real TCP connections.

Each agent connection is served by its own task with its own transport, so one
agent's bad frame or slow socket ends or slows only that session. Every OPEN is
checked against the destination policy after DNS resolution (see net/dial.py).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from functools import partial
from typing import Any

import trio

from . import mux, ws
from .config import RelayConfig
from .metrics import TunnelStats
from .net.channel_stream import ChannelStream
from .net.connect import read_request, tune_socket
from .net.dial import DialError, dial
from .net.splice import splice
from .net.transport import TunnelTransport
from .policy import Policy
from .protocol import TunnelProtocol
from .reload import ReloadRequest

__all__ = ["run_relay", "Relay"]

log = logging.getLogger("wstunnel.relay")


class Relay:
    """State shared by all sessions of one relay process."""

    def __init__(self, config: RelayConfig, stats: TunnelStats | None = None) -> None:
        self.config = config
        self.stats = stats or TunnelStats("relay")
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
            protocol = await self._handshake(stream, peer)
            if protocol is not None:
                await self._serve_session(stream, protocol, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("%s: connection lost during the handshake: %s", peer, exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def _handshake(self, stream: trio.SocketStream, peer: str) -> TunnelProtocol | None:
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
            answer = self._route(handshake, request, peer)
            if answer is not None and answer.startswith((b"HTTP/1.1 401", b"HTTP/1.1 403")):
                self.stats.auth_failures += 1
            if answer is not None:
                await stream.send_all(answer)
                return None
            await stream.send_all(handshake.accept())
            return TunnelProtocol(
                mux.Role.RELAY,
                trailing_data=handshake.trailing_data,
                max_message_size=config.max_message_size,
                initial_window=config.initial_window,
                max_chunk_size=config.max_chunk_size,
                max_channels=config.max_channels,
            )
        log.info(
            "%s: no complete upgrade request within %g s; dropped", peer, config.handshake_timeout
        )
        return None

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
            stats=self.stats,
        )
        self.sessions.add(transport)
        self.stats.session_started(transport)
        self._idle = trio.Event()
        log.info("%s: session up", peer)
        try:
            reason = await transport.run()
        finally:
            self.stats.session_ended(transport)
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
        self.stats.open_failed(reason)
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


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_relay(
    config: RelayConfig,
    *,
    shutdown: trio.Event,
    task_status: Any = trio.TASK_STATUS_IGNORED,
    stats: TunnelStats | None = None,
    reloads: trio.MemoryReceiveChannel[ReloadRequest] | None = None,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve until ``shutdown`` is set, then drain and return.

    ``task_status.started`` receives the bound (host, port) pairs. ``sockets``
    (systemd socket activation) replace binding ``config.listen``. Each
    ``ReloadRequest`` from ``reloads`` applies to channels opened after it.
    """
    relay = Relay(config, stats)
    listeners = await _listeners(config, sockets)
    bound = [listener.socket.getsockname()[:2] for listener in listeners]
    if not config.allow:
        log.warning("no 'allow' rules: every channel will be refused (add --allow HOST[:PORT])")
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            serve = partial(trio.serve_listeners, handler_nursery=connections)
            await accepting.start(serve, relay.handle_connection, listeners)
            log.info("relay listening on %s, tunnel path %s", _addrs(bound), config.path)
            if reloads is not None:
                accepting.start_soon(_apply_reloads, relay, reloads)
            task_status.started(bound)
            await shutdown.wait()
            accepting.cancel_scope.cancel()
        log.info(
            "relay stopping: draining %d sessions (up to %g s)",
            len(relay.sessions),
            relay.config.drain_timeout,
        )
        await relay.drain(relay.config.drain_timeout)
        connections.cancel_scope.cancel()


async def _listeners(
    config: RelayConfig, sockets: list[socket.socket] | None
) -> list[trio.SocketListener]:
    if not sockets:
        return await trio.open_tcp_listeners(config.listen.port, host=config.listen.host)
    log.info("using %d socket(s) from systemd; 'listen' is ignored", len(sockets))
    return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]


async def _apply_reloads(relay: Relay, reloads: trio.MemoryReceiveChannel[ReloadRequest]) -> None:
    """New policy, path and limits for new sessions and channels; open ones keep theirs.

    ``listen`` keeps its old value: the listeners stay bound (the service layer
    logs that the change needs a restart).
    """
    async for request in reloads:
        new: RelayConfig = request.config
        relay.config = dataclasses.replace(new, listen=relay.config.listen)
        relay.policy = _policy(new)
        if not new.allow:
            log.warning("no 'allow' rules after the reload: every new channel will be refused")
        request.finish()


def _addrs(bound: list[tuple[str, int]]) -> str:
    return ", ".join(f"{h}:{p}" for h, p in bound)
