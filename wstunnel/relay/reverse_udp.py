"""``-R udp:``: the UDP socket the relay binds for an agent's lease, and its flows.

The lease is an OPEN of kind UDP_LISTEN (reverse.py answers it as it answers
TCP_LISTEN, with ``udp:`` listen_allow rules). Each client address that sends
to the socket is one flow: the relay opens a channel of kind UDP towards the
agent, naming the listener (its host and port as the agent asked), the
client's datagrams go into it, and what comes back is sent to that client
from the listener's socket: two clients of one port each get their own
replies. The agent runs the flow's idle timer (its forward's
``udp_idle_timeout``) and ends it with FIN; the client's next datagram opens a
new flow. Flows end with the lease (their channels get FIN).

A flow the agent refuses (its target does not resolve, cannot be reached) is
logged once and held for that client for ``REFUSED_HOLD_INTERVAL``, its
datagrams dropped (counted as ``refused``), as the agent's ``-L udp:`` holds
one: no new OPEN, nor warning at the agent, for each datagram.
"""

from __future__ import annotations

import logging
import socket
from functools import partial

import trio

from .. import mux
from ..addresses import join_host_port
from ..errors import ChannelRefused, SessionClosed
from ..net.channel_stream import ChannelStream
from ..net.transport import TunnelTransport
from ..net.udp_flow import (
    RECEIVE_SIZE,
    DatagramFlow,
    receive_more,
    send_or_drop,
    udp_stats,
)

__all__ = ["bind_udp", "serve_datagrams"]

log = logging.getLogger("wstunnel.relay")

Client = tuple[str, int]


def bind_udp(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to the IP literal ``host``.

    Raises:
        OSError: as bind(2) does.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_datagrams(transport: TunnelTransport, listener: socket.socket,
                          lease: ChannelStream, where: str) -> None:
    """Serve the lease's UDP socket until cancelled or closed (ClosedResourceError)."""
    reader = trio.socket.from_stdlib_socket(listener)  # (the same socket object)
    flows: dict[Client, DatagramFlow] = {}
    async with trio.open_nursery() as nursery:
        while True:
            try:
                batch = [await reader.recvfrom(RECEIVE_SIZE), *receive_more(listener)]
            except (ConnectionRefusedError, ConnectionResetError):
                continue  # an ICMP error for an earlier reply
            for data, client in batch:
                flow = flows.get(client)
                if flow is None or not flow.accepting and not flow.refused_until:
                    flow = _open_flow(transport, listener, lease, where, client)
                    if flow is None:
                        continue
                    flows[client] = flow
                    nursery.start_soon(_run, transport, flow, client, flows)
                flow.send(data)


def _open_flow(transport: TunnelTransport, listener: socket.socket, lease: ChannelStream,
               where: str, client: Client) -> DatagramFlow | None:
    try:
        channel = transport.open_channel(lease.host, lease.port, kind=mux.ChannelKind.UDP,
                                         forward=f"-R {where}")
    except (SessionClosed, ChannelRefused) as exc:
        udp_stats.drop("no_session")
        log.debug("%s: dropped a datagram to %s: cannot open a flow: %s", transport.name,
                  where, exc)
        return None
    return DatagramFlow(partial(send_or_drop, listener, address=client), idle_timeout=None,
                        channel=channel, budget=transport.datagram_budget)


async def _run(transport: TunnelTransport, flow: DatagramFlow, client: Client,
               flows: dict[Client, DatagramFlow]) -> None:
    channel = flow.channel
    assert channel is not None
    try:
        why = await flow.run(channel)
        what = (f"{transport.name}: udp flow from {join_host_port(*client[:2])} via "
                f"{channel.forward} refused by the agent")
        if await flow.hold_if_refused(channel, what, log):
            return
        log.debug("%s: udp flow from %s ended: %s", transport.name,
                  join_host_port(*client[:2]), why)
    finally:
        if flows.get(client) is flow:
            del flows[client]
