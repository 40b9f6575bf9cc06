"""The HTTP/1.1 upgrade that opens a WebSocket (RFC 6455 section 4), sans-IO.

Theory of operation: h11 parses the HTTP; this module applies the WebSocket
rules on top and turns the outcome into one event.  The client side builds
the request at construction and reports ``HandshakeAccepted`` or
``HandshakeRejected`` (with status, headers and the start of the body, so a
person can be told what really answered).  The server side reports
``RequestReceived`` (or ``HandshakeFailed`` for a request it cannot parse or
that breaks the size limits); the caller then picks ``accept``, ``reject`` or
``default_response``.

Bytes behind the request or behind the 101 belong to the WebSocket: h11
keeps them in ``trailing_data`` once it sees the protocol switch, and we hand
them on.  h11 bounds only an *incomplete* header block, so a complete but
oversized one arriving in a single read is measured here, as is the header
count (h11 does not count headers).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Final

import h11

from ..errors import LocalProtocolError
from ..slotted import Slotted
from ._http import (
    WEBSOCKET_VERSION,
    Headers,
    check_header_text,
    decode_headers,
    get_header,
    has_token,
    one_line,
    phrase,
    response,
    text_response,
    tokens,
    upgrade_problem,
)

__all__ = [
    "SUBPROTOCOL",
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_HEADERS",
    "ClientHandshake",
    "ServerHandshake",
    "HandshakeAccepted",
    "HandshakeRejected",
    "RequestReceived",
    "HandshakeFailed",
    "accept_key",
]

SUBPROTOCOL: Final = "wstunnel.v1"
DEFAULT_MAX_HEADER_SIZE: Final = 16384
DEFAULT_MAX_HEADERS: Final = 100
#: How much of a rejection's body we keep to show a person.
MAX_BODY_EXCERPT: Final = 1024
_GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3

def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key: base64(SHA-1(key + GUID))."""
    digest = hashlib.sha1((key + _GUID).encode("ascii")).digest()  # RFC-mandated, not for security
    return base64.b64encode(digest).decode("ascii")


# -- client ------------------------------------------------------------------


class HandshakeAccepted(Slotted):
    """The server switched to WebSocket; ``trailing_data`` is the first frame bytes."""

    __slots__ = ("subprotocol", "headers", "trailing_data")

    def __init__(self, subprotocol: str | None, headers: Headers, trailing_data: bytes) -> None:
        self.subprotocol: Final = subprotocol
        self.headers: Final = headers
        self.trailing_data: Final = trailing_data


class HandshakeRejected(Slotted):
    """Anything but a valid 101.  ``status`` is 0 when no HTTP answer came at all."""

    __slots__ = ("status", "reason", "headers", "body", "message")

    def __init__(
        self, status: int, reason: str, headers: Headers, body: bytes, message: str
    ) -> None:
        self.status: Final = status
        self.reason: Final = reason
        self.headers: Final = headers
        self.body: Final = body
        self.message: Final = message


class ClientHandshake:
    """The client side of the opening handshake (RFC 6455 4.1).

    Args:
        host: value of the Host header (``host`` or ``host:port``).
        path: request target, e.g. ``/tunnel``.
        subprotocol: offered in Sec-WebSocket-Protocol and required back;
            None offers and accepts none.
        extra_headers: added to the request as given (e.g. Authorization).
        random_bytes: source of the 16-byte Sec-WebSocket-Key nonce.
        max_header_size: largest response header block we will buffer.
    """

    def __init__(
        self,
        host: str,
        path: str,
        *,
        subprotocol: str | None = SUBPROTOCOL,
        extra_headers: Sequence[tuple[str, str]] = (),
        random_bytes: Callable[[int], bytes] = os.urandom,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    ) -> None:
        check_header_text([("Host", host), *extra_headers])
        self._subprotocol = subprotocol
        self._key = base64.b64encode(random_bytes(16)).decode("ascii")
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_size)
        headers = [
            ("Host", host),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", self._key),
            ("Sec-WebSocket-Version", WEBSOCKET_VERSION),
        ]
        if subprotocol is not None:
            headers.append(("Sec-WebSocket-Protocol", subprotocol))
        headers.extend(extra_headers)
        self._outgoing = self._conn.send(h11.Request(method="GET", target=path, headers=headers))
        self._response: h11.Response | None = None
        self._body = bytearray()
        self._result: HandshakeAccepted | HandshakeRejected | None = None

    def data_to_send(self) -> bytes:
        """The request bytes (once; afterwards b"")."""
        data, self._outgoing = self._outgoing or b"", b""
        return data

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the server, then call ``next_event()``."""
        if self._result is None and data:
            self._conn.receive_data(bytes(data))

    def receive_eof(self) -> None:
        """The server closed its side; ``next_event()`` will then decide."""
        if self._result is None and not self._conn.trailing_data[1]:
            self._conn.receive_data(b"")

    def next_event(self) -> HandshakeAccepted | HandshakeRejected | None:
        """The outcome once known (repeated on later calls), or None for more bytes."""
        while self._result is None:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._result = self._broken(exc)
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            self._handle(event)
        return self._result

    def _handle(self, event: object) -> None:
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                self._result = self._check_switch(event)
            # Other 1xx (100 Continue, 103 Early Hints) precede the real answer.
        elif isinstance(event, h11.Response):
            self._response = event
        elif isinstance(event, h11.Data):
            self._body += event.data[: MAX_BODY_EXCERPT - len(self._body)]
            if len(self._body) >= MAX_BODY_EXCERPT:
                self._result = self._rejected()
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            self._result = self._rejected()

    def _broken(self, exc: h11.RemoteProtocolError) -> HandshakeRejected:
        if self._response is not None:  # body cut short: report what we have
            return self._rejected()
        if self._conn.trailing_data[1]:
            message = "closed the connection before a complete HTTP answer"
        else:
            message = f"answered with something that is not HTTP/1.1 ({exc})"
        return HandshakeRejected(0, "", [], b"", message)

    def _rejected(self) -> HandshakeRejected:
        answer = self._response
        if answer is None:
            message = "closed the connection without an HTTP answer"
            return HandshakeRejected(0, "", [], b"", message)
        reason = answer.reason.decode("latin-1")
        body = bytes(self._body)
        message = f"answered {answer.status_code} {reason}".rstrip()
        if body:
            message += f": {one_line(body)}"
        headers = decode_headers(answer.headers)
        return HandshakeRejected(answer.status_code, reason, headers, body, message)

    def _check_switch(
        self, event: h11.InformationalResponse
    ) -> HandshakeAccepted | HandshakeRejected:
        """Validate the 101 (RFC 6455 4.1, the client MUST _Fail_ on each of these)."""
        headers = decode_headers(event.headers)
        problem = self._switch_problem(headers)
        if problem is not None:
            reason = event.reason.decode("latin-1")
            return HandshakeRejected(101, reason, headers, b"", f"answered 101 but {problem}")
        return HandshakeAccepted(
            get_header(headers, "sec-websocket-protocol"), headers, self._conn.trailing_data[0]
        )

    def _switch_problem(self, headers: Headers) -> str | None:
        if not has_token(get_header(headers, "upgrade"), "websocket"):
            return "without Upgrade: websocket"
        if not has_token(get_header(headers, "connection"), "upgrade"):
            return "without Connection: Upgrade"
        if get_header(headers, "sec-websocket-accept") != accept_key(self._key):
            return "Sec-WebSocket-Accept is wrong"
        if get_header(headers, "sec-websocket-extensions") is not None:
            return "with extensions we did not offer"
        chosen = get_header(headers, "sec-websocket-protocol")
        if chosen is not None and chosen != self._subprotocol:
            return f"with subprotocol {chosen!r}, which we did not offer"
        if chosen is None and self._subprotocol is not None:
            return f"without agreeing to subprotocol {self._subprotocol!r}"
        return None


# -- server ------------------------------------------------------------------


class RequestReceived(Slotted):
    """A complete HTTP request; decide with accept/reject/default_response.

    ``is_upgrade`` says the client asked for a WebSocket (``Upgrade:
    websocket``); ``upgrade_problem`` is set when that request is malformed.
    """

    __slots__ = ("method", "target", "headers", "is_upgrade", "upgrade_problem",
                 "subprotocols")

    def __init__(self, method: str, target: str, headers: Headers | None = None,
                 is_upgrade: bool = False, upgrade_problem: str | None = None,
                 subprotocols: list[str] | None = None) -> None:
        self.method: Final = method
        self.target: Final = target
        self.headers: Final[Headers] = [] if headers is None else headers
        self.is_upgrade: Final = is_upgrade
        self.upgrade_problem: Final = upgrade_problem
        self.subprotocols: Final[list[str]] = [] if subprotocols is None else subprotocols

    def header(self, name: str) -> str | None:
        """Value of a header (case-insensitive; repeats joined with ", ")."""
        return get_header(self.headers, name.lower())


class HandshakeFailed(Slotted):
    """The request could not be parsed or broke a limit: send ``response``, close."""

    __slots__ = ("status", "message", "response")

    def __init__(self, status: int, message: str, response: bytes) -> None:
        self.status: Final = status
        self.message: Final = message
        self.response: Final = response


class ServerHandshake:
    """The server side of the opening handshake (RFC 6455 4.2).

    Args:
        subprotocol: the one subprotocol we speak; echoed when offered.
        max_header_size: largest request line + header block (431 beyond).
        max_headers: most header lines accepted (431 beyond).
    """

    def __init__(
        self,
        *,
        subprotocol: str | None = SUBPROTOCOL,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        self._subprotocol = subprotocol
        self._max_header_size = max_header_size
        self._max_headers = max_headers
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_size)
        self._pending: RequestReceived | None = None  # headers seen, body not yet
        self._result: RequestReceived | HandshakeFailed | None = None
        self._eof = False
        self.trailing_data = b""

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client, then call ``next_event()``."""
        if data and not self._eof:
            self._conn.receive_data(bytes(data))

    def receive_eof(self) -> None:
        """The client closed its side."""
        if not self._eof:
            self._eof = True
            self._conn.receive_data(b"")

    def next_event(self) -> RequestReceived | HandshakeFailed | None:
        """The request or failure once known (repeated later), or None for more bytes.

        A clean EOF before any request byte also gives None: nobody to answer.
        """
        while self._result is None:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
                self._result = _failed(status, f"bad HTTP request: {exc}")
                break
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.ConnectionClosed):
                if self._pending is not None:
                    self._result = _failed(400, "connection closed inside the request body")
                return self._result
            self._handle(event)
        return self._result

    def _handle(self, event: object) -> None:
        if isinstance(event, h11.Request):
            too_big = self._limit_problem(event)
            if too_big is not None:
                self._result = _failed(431, too_big)
            else:
                self._pending = self._describe(event)
        elif isinstance(event, h11.EndOfMessage):
            self._result = self._pending
        # h11.Data: a request body, which an upgrade has no use for; dropped.

    def _limit_problem(self, request: h11.Request) -> str | None:
        """Check what h11 does not: header count and a complete block's size."""
        if len(request.headers) > self._max_headers:
            return f"{len(request.headers)} header lines (limit {self._max_headers})"
        size = len(request.method) + len(request.target) + 12  # "GET / HTTP/1.1\r\n"
        size += sum(len(name) + len(value) + 4 for name, value in request.headers)
        if size > self._max_header_size:
            return f"header block of about {size} bytes (limit {self._max_header_size})"
        return None

    def _describe(self, request: h11.Request) -> RequestReceived:
        headers = decode_headers(request.headers)
        method = request.method.decode("ascii", "replace")
        is_upgrade = has_token(get_header(headers, "upgrade"), "websocket")
        problem = upgrade_problem(method, request.http_version, headers) if is_upgrade else None
        return RequestReceived(
            method=method,
            target=request.target.decode("ascii", "replace"),
            headers=headers,
            is_upgrade=is_upgrade,
            upgrade_problem=problem,
            subprotocols=tokens(get_header(headers, "sec-websocket-protocol")),
        )

    def _request(self) -> RequestReceived:
        if not isinstance(self._result, RequestReceived):
            raise LocalProtocolError("no complete request yet")
        return self._result

    def accept(self, extra_headers: Sequence[tuple[str, str]] = ()) -> bytes:
        """Answer 101 Switching Protocols; afterwards read ``trailing_data``.

        Raises:
            LocalProtocolError: no valid upgrade request to accept.
        """
        request = self._request()
        if not request.is_upgrade or request.upgrade_problem is not None:
            raise LocalProtocolError("accept() needs a valid upgrade request")
        check_header_text(extra_headers)
        key = request.header("sec-websocket-key") or ""
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_key(key.strip())),
        ]
        if self._subprotocol is not None and self._subprotocol in request.subprotocols:
            headers.append(("Sec-WebSocket-Protocol", self._subprotocol))
        headers.extend(extra_headers)
        self.trailing_data = self._conn.trailing_data[0]
        return response(101, headers)

    def reject(self, status: int, text: str = "", headers: Sequence[tuple[str, str]] = ()) -> bytes:
        """An HTTP answer with a one-line text body and ``Connection: close``."""
        if not 200 <= status <= 599:
            raise LocalProtocolError(f"cannot reject with status {status}")
        check_header_text(headers)
        return text_response(status, text, headers)

    def default_response(self) -> bytes:
        """426 for a plain request, 400 for a malformed upgrade (RFC 6455 4.2.2, 4.4)."""
        request = self._request()
        version = [("Sec-WebSocket-Version", WEBSOCKET_VERSION)]
        if not request.is_upgrade:
            text = "this URL serves WebSocket upgrades only"
            upgrade = [("Upgrade", "websocket"), ("Connection", "Upgrade, close")]
            return text_response(426, text, [*upgrade, *version])
        problem = request.upgrade_problem
        if problem is None:
            raise LocalProtocolError("default_response() for a valid upgrade; call accept()")
        wrong_version = request.header("sec-websocket-version") != WEBSOCKET_VERSION
        return text_response(400, problem, version if wrong_version else ())


def _failed(status: int, message: str) -> HandshakeFailed:
    """The detailed message stays local; the peer gets only the status phrase."""
    return HandshakeFailed(status, message, text_response(status, phrase(status).lower()))
