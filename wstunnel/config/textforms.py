"""Text forms shared by YAML files and the command line.

Addresses (``host:port``, ``[bind:]port``, IPv6 always in brackets when a
port follows), ``-L`` forwards, relay URLs and sizes. Parsers here raise
``ValueError`` with a message saying what was expected; the schema's value
parsers (values.py) add the file, line and key path, or the flag's name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Final, NamedTuple
from urllib.parse import urlsplit

from ..addresses import HostPort, bracketed, is_hostname, parse_ip, parse_port, split_fields
from .rate_limit import RateLimit

__all__ = [
    "DEFAULT_BIND_HOST",
    "DEFAULT_PATH",
    "DYNAMIC",
    "LOCAL",
    "MAX_SOCKET_PATH",
    "REVERSE",
    "TCP",
    "UDP",
    "UDP_PREFIX",
    "DEFAULT_UDP_IDLE_TIMEOUT",
    "UNIX_PREFIX",
    "Forward",
    "check_reverse_listen",
    "parse_socket_path",
    "RelayURL",
    "parse_forward",
    "parse_host_port",
    "parse_users",
    "parse_listen",
    "parse_relay_url",
    "parse_size",
    "parse_url_path",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB
DEFAULT_PATH: Final = "/tunnel"
DEFAULT_BIND_HOST: Final = "127.0.0.1"
_SIZE_UNITS: Final = {"": 1, "b": 1, "k": KiB, "kib": KiB, "kb": 1000, "m": MiB, "mib": MiB,
                      "mb": 1000**2, "g": 1024 * MiB, "gib": 1024 * MiB, "gb": 1000**3}
_SIZE_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


class RelayURL(NamedTuple):
    """The parts of an agent's ``relay`` URL that the agent dials."""

    secure: bool  # wss://
    host: str
    port: int
    path: str  # path plus ?query, as sent in the request line

    @property
    def url(self) -> str:
        """The URL as shown in log lines, with the port always written."""
        return f"{'wss' if self.secure else 'ws'}://{bracketed(self.host)}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        """The HTTP Host header value (RFC 9110 §7.2: the port only if not the default)."""
        default = 443 if self.secure else 80
        host = bracketed(self.host)
        return host if self.port == default else f"{host}:{self.port}"


#: ``Forward.kind`` values: ``-L`` (a fixed target), ``-D`` (SOCKS/HTTP proxy) and
#: ``-R`` (the relay listens, the agent dials the target).
LOCAL: Final = "local"
DYNAMIC: Final = "dynamic"
REVERSE: Final = "reverse"
#: How a unix socket target is written: ``unix:/run/app.sock``.
UNIX_PREFIX: Final = "unix:"
#: ``Forward.protocol`` values; a UDP forward is written ``-L udp:...``, ``-R udp:...``.
TCP: Final = "tcp"
UDP: Final = "udp"
UDP_PREFIX: Final = "udp:"
#: A UDP flow ends after this long without a datagram either way (``udp_idle_timeout``).
DEFAULT_UDP_IDLE_TIMEOUT: Final = 60.0
#: sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH: Final = 107


@dataclass(frozen=True, slots=True)
class Forward:
    """One listener and the destination its connections are tunnelled to.

    ``-L``: the agent listens, the relay connects to the target. ``-R``: the
    relay listens (while this agent's session is up), the agent connects to
    the target. A dynamic forward (``-D``) has no target of its own (host ""
    and port 0): each client names its destination in a SOCKS or HTTP proxy
    request. Either end may be a unix socket path instead of host and port
    (``listen_path``, ``target_path``; the host is then "" and the port 0).
    ``users``: the (user, password) pairs a ``-D`` client must give; None: no
    login. ``name``: what status, metrics and logs call it (``label``).
    ``protocol``: TCP, or UDP (``-L``/``-R`` only, host and port at both ends): each
    client address's datagrams are one flow, ended after ``udp_idle_timeout``.
    """

    listen_host: str
    listen_port: int  # 0: any free port
    target_host: str
    target_port: int
    kind: str = LOCAL
    users: frozenset[tuple[str, str]] | None = field(default=None, repr=False)
    listen_path: str | None = None
    target_path: str | None = None
    name: str | None = None
    protocol: str = TCP
    udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT
    #: ``rate_limit:`` (a mapping entry only): this forward's channels, all together.
    rate_limit: RateLimit | None = None

    @classmethod
    def of(cls, listen: HostPort, target: HostPort) -> Forward:
        """Build from two ``HostPort`` values."""
        return cls(listen.host, listen.port, target.host, target.port)

    @classmethod
    def dynamic(cls, listen: HostPort,
                users: frozenset[tuple[str, str]] | None = None) -> Forward:
        """A ``-D`` forward listening on ``listen``."""
        return cls(listen.host, listen.port, "", 0, DYNAMIC, users)

    @property
    def goes_to(self) -> str:
        """Where its connections go, as log lines say it."""
        if self.kind == DYNAMIC:
            return "SOCKS5/SOCKS4a/HTTP proxy (destinations chosen by its clients)"
        if self.kind == REVERSE:
            return f"{self.target_text} (dialled by this agent)"
        return self.target_text

    @property
    def listen(self) -> HostPort:
        """Where the agent (for ``-R``: the relay) listens, when not on a path."""
        return HostPort(self.listen_host, self.listen_port)

    @property
    def listen_text(self) -> str:
        """The listen address or path, as logs say it."""
        if self.listen_path is not None:
            return self.listen_path
        return str(self.listen)

    @property
    def target(self) -> HostPort:
        """Where the relay (for ``-R``: the agent) connects, when not to a path."""
        return HostPort(self.target_host, self.target_port)

    @property
    def target_text(self) -> str:
        """``host:port``, ``unix:/path``, or ``udp host:port`` for a UDP forward."""
        if self.target_path is not None:
            return UNIX_PREFIX + self.target_path
        if self.protocol == UDP:
            return f"udp {self.target}"
        return str(self.target)

    @property
    def label(self) -> str:
        """Its name, else the way it is written on the command line (``-L``'s
        ``127.0.0.1:8080:db:5432``, ``-D 127.0.0.1:1080``)."""
        if self.name is not None:
            return self.name
        if self.kind == DYNAMIC:
            return f"-D {self.listen_text}"
        flag = "-R" if self.kind == REVERSE else "-L"
        if self.protocol == UDP:
            return f"{flag} {UDP_PREFIX}{self.listen_text}:{self.target}"
        return f"{flag} {self.listen_text}:{self.target_text}"

    def __str__(self) -> str:
        where = "relay's " if self.kind == REVERSE else ""
        return f"{where}{self.listen_text} -> {self.goes_to}"


def _host(text: str) -> str:
    """Validate one host field; brackets are required around (and only around) IPv6."""
    if text.startswith("["):
        address = parse_ip(text[1:-1])  # (parse_ip turns ::ffff:a.b.c.d into IPv4)
        if address is None or ":" not in text[1:-1]:
            raise ValueError(f"brackets are only for IPv6 addresses, got {json.dumps(text)}")
        return text[1:-1]
    if parse_ip(text) is not None or is_hostname(text):
        return text
    raise ValueError(f"expected a host name or IP address, got {json.dumps(text)}")


def parse_host_port(text: str, *, allow_zero: bool = False) -> HostPort:
    """Parse ``host:port`` (``[v6]:port``).

    Raises:
        ValueError: with what was expected.
    """
    parts = split_fields(text.strip())
    if len(parts) != 2:
        raise ValueError(f"expected host:port (IPv6 in brackets), got {json.dumps(text)}")
    return HostPort(_host(parts[0]), parse_port(parts[1], allow_zero=allow_zero))


def parse_listen(text: str, *, default_host: str = DEFAULT_BIND_HOST) -> HostPort:
    """Parse a listen address ``[bind:]port``; port 0 means any free port.

    Raises:
        ValueError: with what was expected.
    """
    parts = split_fields(text.strip())
    if len(parts) == 1:
        return HostPort(default_host, parse_port(parts[0], allow_zero=True))
    if len(parts) != 2:
        raise ValueError(f"expected [bind:]port (IPv6 in brackets), got {json.dumps(text)}")
    return parse_host_port(text, allow_zero=True)


def parse_forward(text: str, *, default_host: str = DEFAULT_BIND_HOST,
                  kind: str = LOCAL) -> Forward:
    """Parse ``-L`` or ``-R``: ``[bind:]port:host:port``; the listen side may be a
    unix socket path (``/run/app.sock:host:port``) and the target ``unix:/path``.
    The bind address defaults to 127.0.0.1. ``udp:[bind:]port:host:port``: a UDP
    forward (host and port at both ends).

    Raises:
        ValueError: with what was expected.
    """
    text = text.strip()
    if text.startswith(UDP_PREFIX):
        return _udp_forward(text, default_host, kind)
    expected = (f"expected [bind:]port:host:port (IPv6 in brackets; a /path or unix:/path "
                f"for a unix socket), got {json.dumps(text)}")
    listen_path = None
    if text.startswith("/"):
        listen_path, colon, rest = text.partition(":")
        parts = split_fields(rest) if colon else []
        listen_path = parse_socket_path(listen_path)
    else:
        parts = split_fields(text)
    head = parts[:-2]
    if len(parts) < 2 or (len(head) != 0 if listen_path else len(head) not in (1, 2)):
        raise ValueError(expected)
    target_path = None
    if parts[-2] == UNIX_PREFIX[:-1] and parts[-1].startswith("/"):
        target_path = parse_socket_path(parts[-1])
        target = HostPort("", 0)
    else:
        target = HostPort(_host(parts[-2]), parse_port(parts[-1]))
    listen = HostPort("", 0)
    if listen_path is None:
        bind = _host(head[0]) if len(head) == 2 else default_host
        listen = HostPort(bind, parse_port(head[-1], allow_zero=True))
    forward = Forward(listen.host, listen.port, target.host, target.port, kind,
                      listen_path=listen_path, target_path=target_path)
    if kind == REVERSE:
        check_reverse_listen(forward)
    return forward


def _udp_forward(text: str, default_host: str, kind: str) -> Forward:
    rest = text[len(UDP_PREFIX):]
    if rest.startswith("/") or UNIX_PREFIX in rest:
        raise ValueError(f"a UDP forward needs [bind:]port:host:port (unix sockets are "
                         f"streams), got {json.dumps(text)}")
    try:
        forward = parse_forward(rest, default_host=default_host, kind=kind)
    except ValueError:
        raise ValueError(f"expected udp:[bind:]port:host:port (IPv6 in brackets), got "
                         f"{json.dumps(text)}") from None
    return replace(forward, protocol=UDP)


def check_reverse_listen(forward: Forward) -> None:
    """The relay binds what an agent asks for literally: an IP address, not a name.

    Raises:
        ValueError: a host name, or port 0.
    """
    if forward.listen_path is not None:
        return
    if parse_ip(forward.listen_host) is None:
        raise ValueError(f"the relay listens on IP addresses, not names: use 127.0.0.1, "
                         f"0.0.0.0, [::1] or [::] instead of {forward.listen_host}")
    if forward.listen_port == 0:
        raise ValueError("a reverse forward needs a fixed port on the relay (0 would "
                         "give a port nobody knows)")


def parse_socket_path(text: str) -> str:
    """An absolute unix socket path that fits ``sun_path``.

    Raises:
        ValueError: relative, with NUL, or too long.
    """
    if not text.startswith("/") or "\0" in text:
        raise ValueError(f"expected an absolute unix socket path, got {json.dumps(text)}")
    if len(text.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"a unix socket path may have at most {MAX_SOCKET_PATH} bytes, got "
                         f"{len(text.encode())}; pick a shorter one")
    return text


def parse_users(text: str) -> frozenset[tuple[str, str]]:
    """Parse a users file for a ``-D`` forward: one ``user:password`` a line; blank
    lines and lines starting with ``#`` are skipped.

    Raises:
        ValueError: a line without ``:`` or with an empty user, or no user at all.
    """
    users = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or len(user.encode()) > 255 or len(password.encode()) > 255:
            raise ValueError(f"line {number}: expected user:password (each at most 255 "
                             "bytes, as SOCKS5 allows)")
        users.add((user, password))
    if not users:
        raise ValueError("no user:password line in the file")
    return frozenset(users)


def parse_relay_url(text: str) -> RelayURL:
    """Check and split a ``ws://`` or ``wss://`` relay URL.

    Raises:
        ValueError: wrong scheme, no host, bad port, credentials, fragment or no path.
    """
    parts = urlsplit(text.strip())
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"expected a ws:// or wss:// URL, got {json.dumps(text)}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the URL must not carry a user or password")
    if not parts.hostname:
        raise ValueError(f"the URL has no host: {json.dumps(text)}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"the URL has a bad port: {json.dumps(text)}") from exc
    if parts.fragment:
        raise ValueError("the URL must not have a #fragment (RFC 6455 §3)")
    if not parts.path.startswith("/"):
        raise ValueError(f"the URL has no path; the relay's default is {DEFAULT_PATH}, "
                         f"e.g. {parts.scheme}://{parts.netloc}{DEFAULT_PATH}")
    secure = parts.scheme == "wss"
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return RelayURL(secure, parts.hostname, port or (443 if secure else 80), path)


def parse_url_path(text: str) -> str:
    """Check a URL path the relay serves, such as ``/tunnel``.

    Raises:
        ValueError: not starting with '/', or containing spaces, '?' or '#'.
    """
    if not text.startswith("/") or re.search(r"[\s?#]", text):
        raise ValueError(f"expected a URL path such as {DEFAULT_PATH}, got {json.dumps(text)}")
    return text


def parse_size(text: str) -> int:
    """Parse ``65536``, ``64KiB``, ``1.5 MiB``, ``10MB``; K/M/G alone are binary.

    Raises:
        ValueError: not a size.
    """
    match = _SIZE_RE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 65536, 256KiB or 64MiB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])
