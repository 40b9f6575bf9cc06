"""Who the client really is when the relay sits behind a reverse proxy.

A reverse proxy (nginx, haproxy, a load balancer) connects to the relay
itself, so the socket's peer is the proxy; the client's address arrives in
``X-Forwarded-For``, which every hop appends to. Anybody can send that header,
so it is believed only as far as a chain of ``trusted_proxies`` vouches for
it: starting from the socket's peer and walking the header from the right,
every address in a trusted network is a proxy of ours and is skipped; the
first one that is not is the client. An untrusted peer's header is ignored
entirely, and a client cannot push a spoofed address past our own proxy,
because the proxy appends the address it saw to the right of whatever the
client wrote.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import TypeAlias

from ..addresses import IPAddress, parse_ip

__all__ = ["IPNetwork", "client_address", "parse_trusted_proxy"]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted_proxy(text: str) -> IPNetwork:
    """An IP address or CIDR network (``10.0.0.0/8``, ``::1``, ``[fd00::/8]``).

    Raises:
        ValueError: not an address or network, or host bits set.
    """
    cleaned = text.strip()
    if cleaned.startswith("[") and cleaned.endswith("]"):
        cleaned = cleaned[1:-1]
    try:
        return ipaddress.ip_network(cleaned, strict=True)
    except ValueError as exc:
        try:
            suggestion = ipaddress.ip_network(cleaned, strict=False)
        except ValueError:
            raise ValueError(f"expected an IP address or CIDR network such as 10.0.0.0/8, "
                             f"got {json.dumps(text)}") from exc
        raise ValueError(f"{json.dumps(text)} has host bits set; did you mean "
                         f"{suggestion}?") from exc


def client_address(peer: str, forwarded_for: str | None,
                   trusted: Sequence[IPNetwork]) -> str:
    """The client's address: ``peer`` unless trusted proxies vouch for X-Forwarded-For.

    Args:
        peer: the socket's peer IP address.
        forwarded_for: all X-Forwarded-For values, joined with commas (None: absent).
        trusted: networks whose hops may report the address before them.
    """
    if forwarded_for is None or not _is_trusted(parse_ip(peer), trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    client = peer
    for hop in reversed(hops):
        address = _hop_address(hop)
        if address is None:
            return client  # garbage: believe nothing left of it
        client = str(address)
        if not _is_trusted(address, trusted):
            return client
    return client


def _is_trusted(address: IPAddress | None, trusted: Sequence[IPNetwork]) -> bool:
    return address is not None and any(address in network for network in trusted)


def _hop_address(hop: str) -> IPAddress | None:
    """One X-Forwarded-For entry; some proxies add ``:port`` (IPv6 then in brackets)."""
    if hop.startswith("["):
        return parse_ip(hop[1:].partition("]")[0])
    if hop.count(":") == 1:
        hop = hop.partition(":")[0]
    return parse_ip(hop)
