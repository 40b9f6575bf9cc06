"""``-L udp:[bind:]port:host:port``: a local UDP socket whose flows go through the tunnel.

Theory of operation
-------------------
One UDP socket per forward. Each client address that sends to it is one
*flow*: its first datagram opens a channel of kind UDP to the forward's
target (the OPEN, with that datagram as early data), its later datagrams go
into the same channel, and the datagrams coming back are sent to that client
from the forward's socket, so two clients never see each other's replies.
A flow ends after the forward's ``udp_idle_timeout`` without a datagram
either way (FIN, net/udp_flow.py), when its session ends, or when the relay
refuses it; the client's next datagram opens a new one.

A refused flow (the destination is not allowed, does not resolve, ...) is
logged once and kept for ``REFUSED_HOLD_INTERVAL``, dropping the client's
datagrams (counted as ``refused``) instead of asking the relay again for each.

Everything here is lossy and bounded: datagrams that arrive while the flow
waits for a session or for credit wait in the flow's bounded queue (the
oldest dropped first); a datagram over 65,507 bytes is dropped.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import trio

from .. import mux
from ..net.udp_flow import (
    FORWARD_DATAGRAM_BUDGET,
    RECEIVE_SIZE,
    DatagramBudget,
    DatagramFlow,
    receive_more,
    send_or_drop,
)

if TYPE_CHECKING:
    from ..config import Forward
    from .kinds import ChannelOpener

__all__ = ["bind_udp", "serve_udp_forward"]

log = logging.getLogger("wstunnel.agent")

Client = tuple[str, int]


async def bind_udp(host: str, port: int) -> list[socket.socket]:
    """Non-blocking UDP sockets bound to host:port (one per address it resolves to).

    Raises:
        OSError: from bind, or resolving the host.
    """
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                                          flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, _type, _proto, _name, address in dict.fromkeys(
                (i[0], i[1], i[2], "", i[4]) for i in infos):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            bound.append(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setblocking(False)
            sock.bind(address)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


async def serve_udp_forward(sock: socket.socket, current: Callable[[], Forward],
                            opener: ChannelOpener) -> None:
    """Serve one UDP socket of a forward until cancelled; ``current()`` is the
    forward now (a reload may change its target: new flows take the new one)."""
    reader = trio.socket.from_stdlib_socket(sock)  # (the same socket object)
    flows: dict[Client, DatagramFlow] = {}
    budget = DatagramBudget(FORWARD_DATAGRAM_BUDGET)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                batch = [await reader.recvfrom(RECEIVE_SIZE), *receive_more(sock)]
            except (ConnectionRefusedError, ConnectionResetError):
                continue  # an ICMP error for an earlier reply: nothing to do
            for data, client in batch:
                flow = flows.get(client)
                if flow is None or not flow.accepting and not flow.refused_until:
                    flow = _new_flow(sock, client, current(), opener, flows, nursery, budget)
                flow.send(data)


def _new_flow(sock: socket.socket, client: Client, forward: Forward, opener: ChannelOpener,
              flows: dict[Client, DatagramFlow], nursery: trio.Nursery,
              budget: DatagramBudget) -> DatagramFlow:
    flow = DatagramFlow(partial(send_or_drop, sock, address=client),
                        idle_timeout=forward.udp_idle_timeout, budget=budget)
    flows[client] = flow
    nursery.start_soon(_run_flow, flow, client, forward, opener, flows)
    return flow


async def _run_flow(flow: DatagramFlow, client: Client, forward: Forward,
                    opener: ChannelOpener, flows: dict[Client, DatagramFlow]) -> None:
    try:
        channel = await opener.open_channel(forward.target_host, forward.target_port,
                                            kind=mux.ChannelKind.UDP, forward=forward.label)
        if channel is None:
            flow.discard("no_session")
            return
        why = await flow.run(channel)
        what = f"udp flow from {_client_text(client)} via {forward.label}"
        if not await flow.hold_if_refused(channel, f"{what} refused", log):
            log.debug("udp flow from %s via %s ended: %s", _client_text(client),
                      forward.label, why)
    finally:
        if flows.get(client) is flow:
            del flows[client]


def _client_text(client: Client) -> str:
    host, port = client[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
