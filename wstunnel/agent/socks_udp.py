"""SOCKS5 UDP ASSOCIATE on the ``-D`` port (RFC 1928 section 7).

Theory of operation
-------------------
The client asks on its TCP connection; the agent binds a UDP *relay socket*
on the address the client reached the ``-D`` port at (port chosen by the
kernel) and names it in the reply. The association lives exactly as long as
that TCP connection: when the client closes it (or it breaks), the relay
socket is closed and every flow ends (FIN).

Datagrams to the relay socket carry the SOCKS5 UDP header (destination
address and port); only the client's IP may use the socket (and, once it
named one in its request, only that port; otherwise the first datagram's
source port is the client's). Each destination (host and port, as the client
wrote them: a name goes to the relay unresolved, so its policy and DNS apply)
is one flow, a channel of kind UDP like ``-L udp:`` (net/udp_flow.py); its
replies go back to the client with the header naming that destination.
Fragments (FRAG != 0) are dropped, as the RFC allows a server that does not
reassemble. Flows end after the forward's ``udp_idle_timeout``. A refused
destination is logged once and held as ``-L udp:`` holds it (udp.py).
"""

from __future__ import annotations

import logging
import socket
from functools import partial
from typing import TYPE_CHECKING

import trio

from .. import mux
from ..net.udp_flow import (
    FORWARD_DATAGRAM_BUDGET,
    RECEIVE_SIZE,
    DatagramBudget,
    DatagramFlow,
    send_or_drop,
    udp_stats,
)
from .socks import ProxyHandshake, ProxyRequest, parse_udp_datagram, udp_datagram

if TYPE_CHECKING:
    from .kinds import ChannelOpener

__all__ = ["serve_association"]

log = logging.getLogger("wstunnel.agent")

Destination = tuple[str, int]


class _Association:
    """One UDP ASSOCIATE: its relay socket, the client's address, the flows."""

    def __init__(self, sock: socket.socket, client_host: str, client_port: int,
                 opener: ChannelOpener, label: str, idle_timeout: float) -> None:
        self.sock = sock
        self.client_host = client_host
        self.client: tuple[str, int] | None = (client_host, client_port) if client_port else None
        self.opener = opener
        self.label = label
        self.idle_timeout = idle_timeout
        self.flows: dict[Destination, DatagramFlow] = {}
        self.budget = DatagramBudget(FORWARD_DATAGRAM_BUDGET)  # (all its flows together)

    def from_client(self, source: tuple[str, int]) -> bool:
        """True for a datagram from the client (its IP; its port once known)."""
        if source[0] != self.client_host:
            return False
        if self.client is None:
            self.client = (source[0], source[1])
        return source[:2] == self.client

    def deliver(self, destination: Destination, payload: bytes) -> None:
        if self.client is not None:
            send_or_drop(self.sock, udp_datagram(*destination, payload), self.client)

    async def serve(self) -> None:
        reader = trio.socket.from_stdlib_socket(self.sock)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    data, source = await reader.recvfrom(RECEIVE_SIZE)
                except (ConnectionRefusedError, ConnectionResetError):
                    continue
                parsed = parse_udp_datagram(data) if self.from_client(source) else None
                if parsed is None:
                    udp_stats.drop("refused")
                    continue
                host, port, payload = parsed
                flow = self.flows.get((host, port))
                if flow is None or not flow.accepting and not flow.refused_until:
                    flow = self._new_flow((host, port), nursery)
                flow.send(payload)

    def _new_flow(self, destination: Destination, nursery: trio.Nursery) -> DatagramFlow:
        flow = DatagramFlow(partial(self.deliver, destination), idle_timeout=self.idle_timeout,
                            budget=self.budget)
        self.flows[destination] = flow
        nursery.start_soon(self._run_flow, destination, flow)
        return flow

    async def _run_flow(self, destination: Destination, flow: DatagramFlow) -> None:
        try:
            channel = await self.opener.open_channel(*destination, kind=mux.ChannelKind.UDP,
                                                     forward=self.label)
            if channel is None:
                flow.discard("no_session")
                return
            why = await flow.run(channel)
            host, port = destination
            if await flow.hold_if_refused(
                    channel, f"SOCKS5 udp flow to {host}:{port} via {self.label} refused", log):
                return
            log.debug("SOCKS5 udp flow to %s:%d ended: %s", *destination, why)
        finally:
            if self.flows.get(destination) is flow:
                del self.flows[destination]


async def serve_association(stream: trio.SocketStream, handshake: ProxyHandshake,
                            request: ProxyRequest, opener: ChannelOpener, label: str,
                            idle_timeout: float) -> None:
    """Answer a UDP ASSOCIATE and serve it until the client's TCP connection ends."""
    local_host = stream.socket.getsockname()[0]
    client_host = stream.socket.getpeername()[0]
    family = socket.AF_INET6 if ":" in local_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((local_host, 0))
        handshake.reply_associated(local_host, sock.getsockname()[1])
        await stream.send_all(handshake.data_to_send())
        association = _Association(sock, client_host, request.port, opener, label,
                                   idle_timeout)
        log.info("SOCKS5 UDP ASSOCIATE from %s via %s: relay socket %s:%d", client_host,
                 label, local_host, sock.getsockname()[1])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(association.serve)
            while await stream.receive_some(1024):
                pass  # (RFC 1928: nothing more is sent on it; it only marks the lifetime)
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, OSError) as exc:
        log.debug("SOCKS5 UDP association ended: %r", exc)
    finally:
        trio.socket.from_stdlib_socket(sock).close()
        await trio.aclose_forcefully(stream)
