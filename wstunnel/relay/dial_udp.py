"""The relay's side of a UDP flow (channel kind UDP): resolve, check, connect, carry.

An OPEN of kind UDP names the flow's destination (host, port). As for TCP, a
name is resolved here and every address is checked against the agent's
``udp:`` allow rules after DNS (a TCP rule never allows UDP; a name no rule
could allow is refused before DNS, without a lookup); the flow uses
the first allowed address (UDP has no handshake to race). The socket is a
UDP socket ``connect``-ed to it, so the kernel passes up only that
destination's replies. An IP literal is checked and connected at once, in the
reader's task; a name needs the rest (DNS) in a task.

Carrying (``carry_flow``) is not the socket pump's job: datagrams are not a
byte stream. Each flow runs net/udp_flow.py's ``carry_connected`` in a task of
its own. The relay runs no idle timer for a flow: the agent's forward has the
``udp_idle_timeout`` and ends idle flows with FIN, which the relay answers.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

from .. import mux
from ..net.udp_flow import carry_connected
from .dial import (
    Address,
    Connecting,
    DialError,
    dns_failure,
    forbidden,
    literal_address,
    refuse_before_dns,
)

if TYPE_CHECKING:
    from ..net.channel_stream import ChannelStream
    from ..net.transport import TunnelTransport
    from ..security.policy import Policy

__all__ = ["UdpConnector", "carry_flow"]

log = logging.getLogger("wstunnel.relay")

#: connect() errors on a UDP socket (no packet is sent): the OPEN_FAILED reason.
_CONNECT_FAILURES: Final = {
    errno.ENETUNREACH: mux.OpenFailure.UNREACHABLE,
    errno.EHOSTUNREACH: mux.OpenFailure.UNREACHABLE,
    errno.EADDRNOTAVAIL: mux.OpenFailure.UNREACHABLE,
    errno.EACCES: mux.OpenFailure.FORBIDDEN,  # e.g. a broadcast address
    errno.EPERM: mux.OpenFailure.FORBIDDEN,
}


class UdpConnector:
    """A UDP flow's destination: checked against ``udp:`` rules, then a connected
    UDP socket (at once for an IP literal; after DNS, in a task, for a name)."""

    def connect(self, host: str, port: int, policy: Policy, *,
                timeout: float) -> socket.socket | Connecting:
        """See ``dial.Connector``.

        Raises:
            DialError: forbidden by policy, or no socket could be connected.
        """
        address = literal_address(host)
        if address is None:
            refuse_before_dns(host, port, policy.refusal_before_dns(host, port, udp=True),
                              udp=True)
            return partial(_resolve_and_connect, host, port, policy, timeout)
        return _connect(host, port, _allowed(host, port, [address], policy))


async def _resolve_and_connect(host: str, port: int, policy: Policy,
                               timeout: float) -> socket.socket:
    with trio.move_on_after(timeout):
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise dns_failure(host, exc) from exc
        addresses = list(dict.fromkeys(
            ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
        return _connect(host, port, _allowed(host, port, addresses, policy))
    raise DialError(mux.OpenFailure.TIMEOUT, f"resolving {host} timed out after {timeout:g} s")


def _allowed(host: str, port: int, addresses: list[Address], policy: Policy) -> Address:
    """The first address of ``addresses`` that the policy allows for UDP."""
    for address in addresses:
        if policy.allows(host, port, address, udp=True):
            return address
    shown = ", ".join(str(a) for a in addresses[:3])
    why = policy.refusal(host, port, addresses[0], udp=True) if addresses else None
    resolved = f"resolves to {shown}" if literal_address(host) is None else None
    raise forbidden(f"udp {host}:{port}", why, resolved)


def _connect(host: str, port: int, address: Address) -> socket.socket:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:  # out of file descriptors
        raise DialError(mux.OpenFailure.INTERNAL_ERROR,
                        f"cannot make a UDP socket: {exc.strerror}") from exc
    try:
        sock.setblocking(False)
        sock.connect((str(address), port))
    except OSError as exc:
        sock.close()
        reason = _CONNECT_FAILURES.get(exc.errno or 0, mux.OpenFailure.UNREACHABLE)
        raise DialError(reason, f"udp {host}:{port}: "
                        f"{(exc.strerror or str(exc)).lower()}") from exc
    return sock


def carry_flow(transport: TunnelTransport, channel: ChannelStream,
               sock: socket.socket) -> Callable[[], Awaitable[None]] | None:
    """Accept the flow's channel; the rest carries its datagrams (a task per flow)."""
    if not transport.accept(channel):
        sock.close()  # the session ended or the agent reset the channel meanwhile
        return None
    return partial(_carry, transport, channel, sock)


async def _carry(transport: TunnelTransport, channel: ChannelStream,
                 sock: socket.socket) -> None:
    why = await carry_connected(channel, sock, idle_timeout=None,
                                budget=transport.datagram_budget)
    log.debug("%s: udp flow %d to %s ended: %s", transport.name, channel.channel_id,
              channel.destination, why)
