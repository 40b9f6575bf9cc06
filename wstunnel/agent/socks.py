"""The ``-D`` proxy handshake, sans-IO: SOCKS5, SOCKS4/4a and HTTP proxy on one port.

Theory of operation
-------------------
``ProxyHandshake`` reads a client's bytes (``receive_data``) until it knows
where the client wants to go, writing what the protocol asks for on the way
(the SOCKS5 method choice and RFC 1929 login answer) into ``data_to_send``.
``next_event`` then says ``ProxyRequest`` (host, port, and the bytes to send
to the destination first), ``ProxyFailed`` (a reply is queued; send it and
close), or None (more bytes are needed). The caller opens the channel and,
once the relay has answered, calls ``reply_opened`` or ``reply_refused``.

The first byte tells the protocol: 5 is SOCKS5, 4 SOCKS4 (4a when the address
is 0.0.0.x), a letter an HTTP request line. Names are never resolved here: the
relay resolves them, so its policy sees the name and the addresses.

A SOCKS5 UDP ASSOCIATE (RFC 1928 section 7) is a ``ProxyRequest`` with
``udp_associate`` set (host and port: where the client says it will send
from, often zeros); the caller binds a UDP relay socket and answers with
``reply_associated``. ``parse_udp_datagram`` and ``udp_datagram`` read and
write the header each datagram to and from that socket carries.

An HTTP ``CONNECT`` is answered like SOCKS; any other method with an
absolute-form URL (``GET http://host/path``) is sent to the destination in
origin form with ``Connection: close`` (the next request may be for another
host, so the connection carries one request), the proxy and hop-by-hop headers
removed and ``Host`` taken from the URL; bytes after its body (a pipelined
request) are not sent (request_body.py).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from ..mux import OpenFailure
from .request_body import RequestBody, request_body

__all__ = ["DEFAULT_MAX_REQUEST_SIZE", "ProxyFailed", "ProxyHandshake", "ProxyRequest",
           "parse_udp_datagram", "udp_datagram"]

#: The most bytes a request may take before its destination is known (an HTTP head).
DEFAULT_MAX_REQUEST_SIZE: Final = 16 * 1024
Users = frozenset[tuple[str, str]]

_SOCKS5_REPLIES: Final = {OpenFailure.FORBIDDEN: 0x02, OpenFailure.UNREACHABLE: 0x04,
                          OpenFailure.DNS_FAILURE: 0x04, OpenFailure.REFUSED: 0x05}
_HTTP_REPLIES: Final = {OpenFailure.FORBIDDEN: (403, "Forbidden", "the relay's policy does "
                                                "not allow this destination"),
                        OpenFailure.REFUSED: (502, "Bad Gateway", "the destination refused "
                                              "the connection"),
                        OpenFailure.UNREACHABLE: (502, "Bad Gateway", "the destination is "
                                                  "unreachable from the relay"),
                        OpenFailure.DNS_FAILURE: (502, "Bad Gateway", "the relay cannot "
                                                  "resolve the destination's name"),
                        OpenFailure.TIMEOUT: (504, "Gateway Timeout", "the relay timed out "
                                              "connecting to the destination")}
_DROPPED_HEADERS: Final = frozenset({b"proxy-authorization", b"proxy-connection",
                                     b"connection", b"keep-alive", b"host", b"te",
                                     b"upgrade"})


class Protocol(enum.Enum):
    SOCKS5 = "SOCKS5"
    SOCKS4 = "SOCKS4"
    HTTP_CONNECT = "HTTP CONNECT"
    HTTP_FORWARD = "HTTP"


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """The client asked for host:port; ``early`` goes to the destination first."""

    protocol: Protocol
    host: str
    port: int
    early: bytes
    udp_associate: bool = False  # SOCKS5 UDP ASSOCIATE: no channel; reply_associated
    #: A plain HTTP request (HTTP_FORWARD): the rest of its body, to take from the
    #: client's later bytes; what follows it is not sent (request_body.py).
    body: RequestBody | None = None


@dataclass(frozen=True, slots=True)
class ProxyFailed:
    """The handshake failed; the reply (if any) is in ``data_to_send``: send, then close."""

    reason: str


class _Bad(Exception):
    def __init__(self, reason: str, reply: bytes = b"") -> None:
        super().__init__(reason)
        self.reply = reply


class _State(enum.Enum):
    START = 0
    SOCKS5_GREETING = 1
    SOCKS5_LOGIN = 2
    SOCKS5_REQUEST = 3
    SOCKS4 = 4
    HTTP = 5
    REQUESTED = 6
    DONE = 7


class ProxyHandshake:
    """One client's proxy handshake; see the module docstring.

    Args:
        users: (user, password) pairs a client must give (SOCKS5 login or HTTP
            ``Proxy-Authorization: Basic``); None: no login (SOCKS4 is then
            refused when users are set: it has no password).
        max_request_size: the most bytes before the destination is known.
    """

    def __init__(self, users: Users | None = None, *,
                 max_request_size: int = DEFAULT_MAX_REQUEST_SIZE) -> None:
        self._users = users
        self._max = max_request_size
        self._buffer = bytearray()
        self._out = bytearray()
        self._state = _State.START
        self._eof = False
        self.protocol: Protocol | None = None
        self.failure: str | None = None

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; then call ``next_event``."""
        self._buffer += data

    def receive_eof(self) -> None:
        """The client closed its side; ``next_event`` then fails an unfinished request."""
        self._eof = True

    def data_to_send(self) -> bytes:
        """Bytes for the client, now."""
        out, self._out = bytes(self._out), bytearray()
        return out

    def next_event(self) -> ProxyRequest | ProxyFailed | None:
        """Advance: the request, a failure (reply queued), or None for more bytes."""
        if self._state in (_State.REQUESTED, _State.DONE):
            return None
        try:
            event = self._advance()
        except _Bad as bad:
            return self._fail(str(bad), bad.reply)
        if event is None and self._eof:
            return self._fail("the client closed the connection before its request ended")
        if event is None and len(self._buffer) > self._max:
            return self._fail(f"request longer than {self._max} bytes", self._too_big())
        return event

    def reply_opened(self) -> None:
        """The relay connected: queue the success reply (nothing for a plain HTTP request:
        the destination answers it)."""
        self._finish()
        if self.protocol is Protocol.SOCKS5:
            self._out += b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        elif self.protocol is Protocol.SOCKS4:
            self._out += b"\x00\x5a\x00\x00\x00\x00\x00\x00"
        elif self.protocol is Protocol.HTTP_CONNECT:
            self._out += b"HTTP/1.1 200 Connection established\r\n\r\n"

    def reply_associated(self, host: str, port: int) -> None:
        """A UDP ASSOCIATE succeeded: queue the reply naming the UDP relay socket
        (an IP literal and port) the client sends its datagrams to."""
        self._finish()
        self._out += b"\x05\x00\x00" + _socks5_address(host, port)

    def reply_refused(self, reason: int | None) -> None:
        """The relay refused (``reason``: an ``OpenFailure`` value, None: no session):
        queue the protocol's error reply; then send it and close."""
        self._finish()
        failure = _failure(reason)
        if self.protocol is Protocol.SOCKS5:
            code = _SOCKS5_REPLIES.get(failure, 0x01) if failure else 0x01
            self._out += bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])
        elif self.protocol is Protocol.SOCKS4:
            self._out += b"\x00\x5b\x00\x00\x00\x00\x00\x00"
        else:
            status = _HTTP_REPLIES.get(failure) if failure else None
            self._out += _http_error(*(status or (
                502, "Bad Gateway", "the relay could not connect" if failure else
                "the agent could not open a channel to the relay (no session, or the "
                "open was refused at once): see the agent's log")))

    def _finish(self) -> None:
        if self._state is not _State.REQUESTED:
            raise RuntimeError("reply only once, after a ProxyRequest")
        self._state = _State.DONE

    def _fail(self, reason: str, reply: bytes = b"") -> ProxyFailed:
        self._state = _State.DONE
        self.failure = reason
        self._out += reply
        return ProxyFailed(reason)

    def _too_big(self) -> bytes:
        if self.protocol in (Protocol.HTTP_CONNECT, Protocol.HTTP_FORWARD):
            return _http_error(431, "Request Header Fields Too Large", "the request is too long")
        if self.protocol is Protocol.SOCKS4:  # (a user id or name with no end in sight)
            return b"\x00\x5b\x00\x00\x00\x00\x00\x00"
        return b""

    # -- the protocols ---------------------------------------------------------

    def _advance(self) -> ProxyRequest | None:
        while True:
            before = self._state
            event = self._step()
            if event is not None or self._state is before:
                return event

    def _step(self) -> ProxyRequest | None:
        if not self._buffer:
            return None
        state = self._state
        if state is _State.START:
            self._start()
        elif state is _State.SOCKS5_GREETING:
            self._socks5_greeting()
        elif state is _State.SOCKS5_LOGIN:
            self._socks5_login()
        elif state is _State.SOCKS5_REQUEST:
            return self._socks5_request()
        elif state is _State.SOCKS4:
            return self._socks4()
        else:
            return self._http()
        return None

    def _start(self) -> None:
        first = self._buffer[0]
        if first == 5:
            self.protocol, self._state = Protocol.SOCKS5, _State.SOCKS5_GREETING
        elif first == 4:
            self.protocol, self._state = Protocol.SOCKS4, _State.SOCKS4
        elif 0x41 <= first <= 0x5A or 0x61 <= first <= 0x7A:
            self.protocol, self._state = Protocol.HTTP_FORWARD, _State.HTTP
        else:
            raise _Bad(f"not SOCKS5, SOCKS4 or HTTP (first byte 0x{first:02x})")

    def _socks5_greeting(self) -> None:
        buf = self._buffer
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return
        methods = bytes(buf[2:2 + buf[1]])
        del buf[:2 + len(methods)]
        wanted = 0x02 if self._users is not None else 0x00
        if wanted not in methods:
            what = "username/password" if wanted else "no authentication"
            raise _Bad(f"SOCKS5 client does not offer {what}", b"\x05\xff")
        self._out += bytes([5, wanted])
        self._state = _State.SOCKS5_LOGIN if wanted else _State.SOCKS5_REQUEST

    def _socks5_login(self) -> None:
        """RFC 1929: VER=1 ULEN UNAME PLEN PASSWD; answer 1 0 (ok) or 1 1 (then close)."""
        buf = self._buffer
        if buf[0] != 1:
            raise _Bad(f"SOCKS5 login version {buf[0]}, expected 1", b"\x01\x01")
        if len(buf) < 2 or len(buf) < 3 + buf[1]:
            return
        ulen = buf[1]
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return
        user, password = bytes(buf[2:2 + ulen]), bytes(buf[3 + ulen:3 + ulen + plen])
        del buf[:3 + ulen + plen]
        if not self._login_ok(user, password):
            raise _Bad(f"wrong SOCKS5 user or password (user {user[:64]!r})", b"\x01\x01")
        self._out += b"\x01\x00"
        self._state = _State.SOCKS5_REQUEST

    def _login_ok(self, user: bytes, password: bytes) -> bool:
        ok = False
        for known_user, known_password in self._users or ():
            # (every pair compared, in constant time: no timing tells which part was wrong)
            ok |= (hmac.compare_digest(user, known_user.encode())
                   & hmac.compare_digest(password, known_password.encode()))
        return ok

    def _socks5_request(self) -> ProxyRequest | None:
        buf = self._buffer
        if len(buf) < 5:
            return None
        if buf[0] != 5:
            raise _Bad(f"SOCKS5 request version {buf[0]}", _socks5_error(0x01))
        if buf[1] not in (1, 3):
            raise _Bad(f"SOCKS5 command {buf[1]} (only CONNECT and UDP ASSOCIATE)",
                       _socks5_error(0x07))
        kind = buf[3]
        sizes = {1: 4, 4: 16, 3: 1 + buf[4]}
        if kind not in sizes:
            raise _Bad(f"SOCKS5 address type {kind}", _socks5_error(0x08))
        end = 4 + sizes[kind] + 2
        if len(buf) < end:
            return None
        raw = bytes(buf[4:end - 2])
        host = _socks_host(kind, raw, _socks5_error(0x01))
        port = int.from_bytes(buf[end - 2:end], "big")
        if buf[1] == 3:  # UDP ASSOCIATE: port 0 means "not known yet"
            self._buffer.clear()
            self._state = _State.REQUESTED
            return ProxyRequest(Protocol.SOCKS5, host, port, b"", udp_associate=True)
        return self._requested(host, port, end)

    def _socks4(self) -> ProxyRequest | None:
        """VN=4 CD PORT IP USERID NUL [HOST NUL when IP is 0.0.0.x, x != 0: SOCKS4a]."""
        buf = self._buffer
        if len(buf) < 8:
            return None
        refused = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
        if buf[1] != 1:
            raise _Bad(f"SOCKS4 command {buf[1]} (only CONNECT)", refused)
        if self._users is not None:
            raise _Bad("SOCKS4 has no password and this proxy needs a login", refused)
        user_end = buf.find(b"\0", 8)
        if user_end < 0:
            return None
        host, end = str(ipaddress.IPv4Address(bytes(buf[4:8]))), user_end + 1
        if buf[4:7] == b"\0\0\0" and buf[7] != 0:
            name_end = buf.find(b"\0", end)
            if name_end < 0:
                return None
            host = _name(bytes(buf[end:name_end]), refused)
            end = name_end + 1
        return self._requested(host, int.from_bytes(buf[2:4], "big"), end)

    def _http(self) -> ProxyRequest | None:
        buf = self._buffer
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        if head_end + 4 > self._max:  # (a head that came whole in one read is no exception)
            raise _Bad(f"request longer than {self._max} bytes", self._too_big())
        lines = bytes(buf[:head_end]).split(b"\r\n")
        method, target = _request_line(lines[0])
        headers = [_header(line) for line in lines[1:]]
        self._check_http_login(headers)
        if method == b"CONNECT":
            self.protocol = Protocol.HTTP_CONNECT
            host, port = _authority(target)
            return self._requested(host, port, head_end + 4)
        host, port, path, authority = _absolute_url(target)
        try:
            body = request_body(headers)
        except ValueError as exc:
            raise _bad_request(f"cannot tell where the request body ends: {exc}") from exc
        # (RFC 9112 section 3.2.2: Host MUST be replaced by the URL's authority; RFC 9110
        # section 7.6.1: the headers Connection names are this hop's, as TE and Upgrade)
        dropped = _DROPPED_HEADERS | {name.strip().lower() for n, v in headers
                                      if n.lower() == b"connection" for name in v.split(b",")}
        kept = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers
                        if name.lower() not in dropped)
        head = (b"%s %s %s\r\nHost: %s\r\n" % (method, path, lines[0].rsplit(b" ", 1)[1],
                                                authority)
                + kept + b"Connection: close\r\n\r\n")
        return self._requested(host, port, head_end + 4, head, body)

    def _check_http_login(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self._users is None:
            return
        given = [v for n, v in headers if n.lower() == b"proxy-authorization"]
        scheme, _, encoded = (given[0] if given else b"").partition(b" ")
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            user = password = b""
        if scheme.lower() != b"basic" or not self._login_ok(user, password):
            raise _Bad("no or wrong proxy login (Proxy-Authorization)", _http_error(
                407, "Proxy Authentication Required", "this proxy needs a user and password",
                b'Proxy-Authenticate: Basic realm="wstunnel"\r\n'))

    def _requested(self, host: str, port: int, end: int, head: bytes = b"",
                   body: RequestBody | None = None) -> ProxyRequest:
        if port == 0:
            raise _Bad("destination port 0", self._refusal())
        rest = bytes(self._buffer[end:])
        if body is not None and rest:
            try:
                rest = body.take(rest)  # (a pipelined request behind it stays here)
            except ValueError as exc:
                raise _bad_request(str(exc)) from exc
        self._buffer.clear()
        self._state = _State.REQUESTED
        assert self.protocol is not None
        return ProxyRequest(self.protocol, host, port, head + rest, body=body)

    def _refusal(self) -> bytes:
        if self.protocol is Protocol.SOCKS5:
            return _socks5_error(0x01)
        if self.protocol is Protocol.SOCKS4:
            return b"\x00\x5b\x00\x00\x00\x00\x00\x00"
        return _http_error(400, "Bad Request", "the destination port is 0")


def _failure(reason: int | None) -> OpenFailure | None:
    try:
        return None if reason is None else OpenFailure(reason)
    except ValueError:
        return None


def _socks5_error(code: int) -> bytes:
    return bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])


def _socks5_address(host: str, port: int) -> bytes:
    """ATYP, address and port as SOCKS5 writes them (an IP literal, else a name)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        return b"\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")
    kind = b"\x01" if address.version == 4 else b"\x04"
    return kind + address.packed + port.to_bytes(2, "big")


def parse_udp_datagram(datagram: bytes) -> tuple[str, int, bytes] | None:
    """(destination host, port, payload) of a datagram a SOCKS5 UDP client sent to the
    relay socket (RFC 1928 section 7: RSV RSV FRAG ATYP DST.ADDR DST.PORT DATA); None
    for a fragment (FRAG != 0: not supported, dropped as the RFC allows), a bad
    header, or port 0."""
    if len(datagram) < 4 or datagram[0] or datagram[1] or datagram[2]:
        return None
    kind = datagram[3]
    sizes = {1: 4, 4: 16, 3: 1 + (datagram[4] if len(datagram) > 4 else 0)}
    if kind not in sizes or len(datagram) < 4 + sizes[kind] + 2:
        return None
    end = 4 + sizes[kind]
    try:
        host = _socks_host(kind, datagram[4:end], b"")
    except (_Bad, ValueError):
        return None
    port = int.from_bytes(datagram[end:end + 2], "big")
    return (host, port, datagram[end + 2:]) if port else None


def udp_datagram(host: str, port: int, payload: bytes) -> bytes:
    """A datagram for a SOCKS5 UDP client: the header naming where the payload came
    from (host and port as the client named them), then the payload."""
    return b"\x00\x00\x00" + _socks5_address(host, port) + payload


def _socks_host(kind: int, raw: bytes, reply: bytes) -> str:
    if kind == 1:
        return str(ipaddress.IPv4Address(raw))
    if kind == 4:
        return str(ipaddress.IPv6Address(raw))
    return _name(raw[1:], reply)


def _name(raw: bytes, reply: bytes) -> str:
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        name = ""
    if not name or not name.isprintable() or " " in name:
        raise _Bad(f"bad destination name {raw[:64]!r}", reply)
    return name


def _http_error(status: int, phrase: str, body: str, extra: bytes = b"") -> bytes:
    text = f"{status} {phrase}: {body}\n".encode()
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(text)}\r\nConnection: close\r\n").encode() + extra + \
        b"\r\n" + text


def _bad_request(what: str) -> _Bad:
    return _Bad(what, _http_error(400, "Bad Request", what))


def _request_line(line: bytes) -> tuple[bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
        raise _bad_request("not an HTTP/1.x request line")
    return parts[0], parts[1]


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, colon, value = line.partition(b":")
    if not colon or not name or name != name.strip() or b" " in name:
        raise _bad_request("malformed header line")
    return name, value.strip()


def _authority(target: bytes) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) of a CONNECT."""
    try:
        parts = urlsplit("//" + target.decode("ascii"))
        host, port = parts.hostname, parts.port
    except (UnicodeDecodeError, ValueError):
        host = port = None
    if not host or port is None or parts.path or parts.username is not None:
        raise _bad_request("CONNECT needs host:port")
    return host, port


def _absolute_url(target: bytes) -> tuple[str, int, bytes, bytes]:
    """host, port, the origin-form path and the authority (``host[:port]``, for Host)
    of ``http://host[:port]/path?query``."""
    try:
        parts = urlsplit(target.decode("ascii"))
        host, port = parts.hostname, 80 if parts.port is None else parts.port
    except (UnicodeDecodeError, ValueError):
        raise _bad_request("bad URL") from None
    if parts.scheme.lower() != "http" or not host:
        raise _bad_request("expected CONNECT or an absolute http:// URL (a proxy request)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, path.encode("ascii"), parts.netloc.rpartition("@")[2].encode("ascii")
