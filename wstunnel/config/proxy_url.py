"""Which HTTP proxy the agent dials through: the ``proxy`` setting and the environment.

Pure functions (no I/O but reading the mapping they are given):

- ``parse_proxy_url`` checks ``http://[user[:password]@]host[:port]`` (a bare
  ``host:port`` means ``http://``). Only plain-HTTP proxies are supported:
  the agent sends CONNECT in the clear and runs TLS to the relay inside the
  tunnel, which is what corporate proxies on port 3128/8080 expect.
- ``proxy_from_environment`` applies the conventions curl, Python and Go
  share: ``https_proxy``/``HTTPS_PROXY`` for wss:// relays,
  ``http_proxy``/``HTTP_PROXY`` for ws://, lower case first; ``no_proxy``/
  ``NO_PROXY`` lists hosts reached directly.

A ``ProxyURL`` never shows its password: ``str()`` and ``repr()`` print
``http://user:***@host:port`` so a log line or traceback cannot leak it.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote, urlsplit

from ..addresses import is_hostname, join_host_port, normalize_hostname, parse_ip

__all__ = [
    "NO_PROXY",
    "ProxyURL",
    "bypasses_proxy",
    "parse_proxy_url",
    "proxy_from_environment",
]

#: The ``proxy`` value meaning "connect directly and ignore the environment".
NO_PROXY: Final = "none"
DEFAULT_PROXY_PORT: Final = 80  # the http:// default; most proxies need an explicit :3128 or :8080


@dataclass(frozen=True)
class ProxyURL:
    """An HTTP proxy to send CONNECT to, with optional Basic credentials."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    source: str = "proxy"  # where it came from, for messages: "proxy", "HTTPS_PROXY", ...

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets), as named in messages."""
        return join_host_port(self.host, self.port)

    def __str__(self) -> str:
        user = ""
        if self.username is not None:
            user = self.username + (":***" if self.password is not None else "") + "@"
        return f"http://{user}{self.address}"

    def __repr__(self) -> str:
        return f"ProxyURL({str(self)!r}, source={self.source!r})"


def parse_proxy_url(text: str, *, source: str = "proxy") -> ProxyURL:
    """Check and split a proxy URL.

    Raises:
        ValueError: another scheme, no host, a bad port, or a path/query.
    """
    text = text.strip()
    shown = json.dumps(_redacted(text))
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise ValueError(f"expected an http:// proxy URL (TLS to the proxy is not supported; "
                         f"the tunnel inside it is still TLS for wss://), got {shown}")
    if not parts.hostname:
        raise ValueError(f"the proxy URL has no host: {shown}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"the proxy URL has a bad port: {shown}") from exc
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a proxy URL is http://[user[:password]@]host[:port], got {shown}")
    host = parts.hostname
    if parse_ip(host) is None and not is_hostname(host):
        raise ValueError(f"the proxy URL has a bad host: {shown}")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return ProxyURL(host, port or DEFAULT_PROXY_PORT, username, password, source)


def _redacted(text: str) -> str:
    """``text`` with any password replaced by ``***``, for error messages."""
    scheme, sep, rest = text.rpartition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hostpart}"


def proxy_from_environment(environ: Mapping[str, str], host: str, port: int,
                           secure: bool) -> ProxyURL | None:
    """The proxy the environment asks for to reach ``host:port``, or None.

    Raises:
        ValueError: naming the variable, when its value is not a usable proxy URL.
    """
    names = ("https_proxy", "HTTPS_PROXY") if secure else ("http_proxy", "HTTP_PROXY")
    for name in names:
        value = environ.get(name, "").strip()
        if not value:
            continue
        no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
        if bypasses_proxy(no_proxy, host, port):
            return None
        try:
            return parse_proxy_url(value, source=name)
        except ValueError as exc:
            raise ValueError(f"environment variable {name}: {exc}") from exc
    return None


def bypasses_proxy(no_proxy: str, host: str, port: int) -> bool:
    """Whether a ``NO_PROXY`` list says to reach ``host:port`` directly.

    Entries are separated by commas or spaces: ``*`` (everything), a domain
    (``example.com`` and ``.example.com`` both match it and every name below
    it), an IP address or CIDR (matched only against a relay given as an IP;
    names are not resolved), each optionally with ``:port``.
    """
    name = normalize_hostname(host)
    address = parse_ip(host)
    for entry in no_proxy.replace(",", " ").split():
        pattern, entry_port = _split_port(entry.strip().lower())
        if entry_port is not None and entry_port != port:
            continue
        if pattern == "*" or _matches(pattern, name, address):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return inside, int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        pattern, _, port = entry.partition(":")
        return pattern, int(port) if port.isdigit() else None
    return entry, None  # a bare IPv6 address or network, or no port


def _matches(pattern: str, name: str,
             address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    if address is not None:
        try:
            return address in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    domain = normalize_hostname(pattern.lstrip("*").lstrip("."))
    return bool(domain) and (name == domain or name.endswith("." + domain))
