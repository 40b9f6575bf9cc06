"""Extra HTTP headers and the Host header the agent sends with its upgrade.

Relays behind CDNs and shared front ends are told apart by headers (a routing
key, a CDN token) or by a Host name other than the address dialled. The agent
adds these to its upgrade request; this module checks them when the config is
loaded so a typo is reported with its file and line, not at connect time.
"""

from __future__ import annotations

import json
import re
from typing import Final

from ..addresses import is_hostname, parse_ip

__all__ = ["check_header", "parse_header_line", "parse_host_header"]

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2
_BAD_VALUE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: Set by the WebSocket handshake itself; overriding them would break the upgrade.
_RESERVED: Final = {
    "host": "use host_header (--host-header) for the Host header",
    "upgrade": "the upgrade sets it",
    "connection": "the upgrade sets it",
    "content-length": "the upgrade request has no body",
    "transfer-encoding": "the upgrade request has no body",
}


def check_header(name: str, value: str) -> tuple[str, str]:
    """Return ``(name, value)`` stripped, if the agent may send it with the upgrade.

    Raises:
        ValueError: not a header name, a control character in the value, or a
            header the handshake sets itself.
    """
    name, value = name.strip(), value.strip()
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"expected a header name (letters, digits, '-'), got {json.dumps(name)}")
    if _BAD_VALUE.search(value):
        raise ValueError(f"the value of header {name} contains a line break or control character")
    lowered = name.lower()
    if lowered in _RESERVED or lowered.startswith("sec-websocket-"):
        reason = _RESERVED.get(lowered, "the WebSocket handshake sets it")
        raise ValueError(f"header {name} cannot be set here: {reason}")
    return name, value


def parse_header_line(text: str) -> tuple[str, str]:
    """``Name: value`` (the command-line form of one header).

    Raises:
        ValueError: no colon, or as ``check_header``.
    """
    name, colon, value = text.partition(":")
    if not colon:
        raise ValueError(f"expected 'Name: value', got {json.dumps(text)}")
    return check_header(name, value)


def parse_host_header(text: str) -> str:
    """A Host header value: ``host`` or ``host:port`` (IPv6 in brackets).

    Raises:
        ValueError: not a host name or address with an optional port.
    """
    value = text.strip()
    host, port = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
        ok = parse_ip(host) is not None and ":" in host
    else:
        if value.count(":") == 1:
            host, _, port = value.partition(":")
        ok = parse_ip(host) is not None or is_hostname(host)
    if not ok or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"expected host or host:port for the Host header, got {json.dumps(text)}")
    return value
