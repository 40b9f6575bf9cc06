"""Address syntax shared by every layer: host names, IP literals, ports, ``host:port``.

Pure functions and values, no DNS and no sockets: the config parsers, the
destination policy and the log lines all read and write addresses the same
way through these.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final, NamedTuple

__all__ = [
    "HostPort",
    "IPAddress",
    "IPNetwork",
    "bracketed",
    "is_hostname",
    "join_host_port",
    "normalize_hostname",
    "parse_ip",
    "parse_port",
    "split_fields",
    "unmap_ipv4",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Letters, digits, hyphen and underscore (common in internal names), 1..63
# characters, not starting or ending with a hyphen (RFC 1123 §2.1, relaxed).
_LABEL: Final = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", re.IGNORECASE)
_MAX_NAME_LENGTH: Final = 253


def normalize_hostname(name: str) -> str:
    """Lower-case ``name`` and drop one trailing dot, so equal names compare equal."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def is_hostname(name: str) -> bool:
    """True if ``name`` is a syntactically valid DNS host name (not an IP).

    The last label may not be all digits, so typos such as ``10.0.0.300``
    are rejected instead of being looked up as names.
    """
    name = normalize_hostname(name)
    if not name or len(name) > _MAX_NAME_LENGTH:
        return False
    labels = name.split(".")
    if labels[-1].isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


def parse_ip(text: str) -> IPAddress | None:
    """Return ``text`` as an IP address, or None if it is not one.

    IPv4-mapped IPv6 addresses (``::ffff:127.0.0.1``) become plain IPv4, so
    they cannot slip past IPv4 rules and blocks.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return unmap_ipv4(address)


def unmap_ipv4(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    """Parse a decimal TCP port.

    Args:
        text: the digits.
        allow_zero: accept 0 ("any free port"), meaningful only for listening.

    Raises:
        ValueError: not a number, or outside 1..65535 (0..65535 with ``allow_zero``).
    """
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"expected a port number, got {text!r}")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is outside {low}..65535")
    return port


class HostPort(NamedTuple):
    """A host (name or IP, IPv6 without brackets) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


def bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def join_host_port(host: str, port: int) -> str:
    """``host:port`` as written in URLs and messages: an IPv6 address in brackets."""
    return f"{bracketed(host)}:{port}"


def split_fields(text: str) -> list[str]:
    """Split on ':' outside brackets; bracketed parts keep their brackets."""
    parts: list[str] = []
    rest = text
    while True:
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise ValueError(f"unclosed '[' in {text!r}")
            parts.append(rest[: end + 1])
            rest = rest[end + 1 :]
            if not rest:
                return parts
            if not rest.startswith(":"):
                raise ValueError(f"expected ':' after ']' in {text!r}")
            rest = rest[1:]
        else:
            field, sep, rest = rest.partition(":")
            parts.append(field)
            if not sep:
                return parts
