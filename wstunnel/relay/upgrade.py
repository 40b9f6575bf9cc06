"""Reading requests on the relay: the upgrade (the sans-IO handshake parses it), and the
HTTP transports' requests (h11, kept for the connection: bodies and keep-alive).

An upgrade has no body, so ``ws.ServerHandshake`` reads a request to its end
before it reports it. An HTTP-transport request (marked by its
``X-Wstunnel-Transport`` header) has one, possibly endless (streaming), so
the same bytes also go to an h11 connection that reports the request at its
head; when the head carries the marker, that connection reads the rest.
"""

from __future__ import annotations

import logging
import select
from dataclasses import dataclass
from typing import Final

import h11
import trio

from .. import ws
from ..framing import TRANSPORT_HEADER
from ..net.plain_stream import PlainSocketStream
from ..net.tls_stream import TLSSocketStream
from ..ws._http import decode_headers

__all__ = ["client_gave_up", "read_request", "HttpRequest", "HttpReader", "send_refusal"]

log = logging.getLogger("wstunnel.relay")

READ_SIZE = 65536
BODY_READ_SIZE = 256 * 1024  # an HTTP transport's bodies: bulk, read in big pieces
MAX_HEADER_SIZE = 16384
#: After a refusal, how long what the client still sends is read (and dropped) ...
REFUSAL_LINGER_TIMEOUT: Final = 2.0
#: ... and how much of it; past either the connection closes anyway (with a reset).
REFUSAL_LINGER_SIZE: Final = 1024 * 1024
_MARKER = TRANSPORT_HEADER.lower().encode()
_BODY_HEADERS: Final = (b"content-length", b"transfer-encoding")
#: What poll reports for a peer that ended its side (FIN: POLLRDHUP, Linux) or reset.
_GONE: Final = (getattr(select, "POLLRDHUP", 0) | getattr(select, "POLLHUP", 0)
                 | getattr(select, "POLLERR", 0))


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """An HTTP-transport request: what the door reads (``request``), and the
    connection's ``reader`` that has its body and the requests after it."""

    request: ws.RequestReceived
    reader: HttpReader


class HttpReader:
    """One connection's HTTP/1.1 requests after the first, and every body (h11)."""

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn

    async def next_event(self) -> object:
        """The next h11 event of the request being read (``h11.Data``, ``EndOfMessage``,
        ``ConnectionClosed``); raises ``h11.RemoteProtocolError`` on garbage.

        A client that sent ``Expect: 100-continue`` may wait for a 100 before its body
        (curl a second): it gets one when the body is first read, not when the request
        is refused on its head (the body is not read then)."""
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.they_are_waiting_for_100_continue:  # (a body read: ask for it)
                await self.send(h11.InformationalResponse(status_code=100, headers=[],
                                                        reason=b"Continue"))
            conn.receive_data(bytes(await self.stream.receive_some(BODY_READ_SIZE)))

    async def next_request(self, handshake: ws.ServerHandshake
                           ) -> ws.RequestReceived | ws.HandshakeFailed | None:
        """The next request on a kept-alive connection (after ``start_next_cycle``), read
        as ``read_request`` reads one on a fresh connection: an HTTP-transport request
        as h11 read it, any other as ``handshake`` does (it is given the head: a front
        end's health check, an upgrade). None when the client closed the connection.
        Raises ``h11.RemoteProtocolError`` for bytes that are no HTTP request
        (``error_status_hint``: the status to answer)."""
        event = await self.next_event()
        if not isinstance(event, h11.Request):
            return None
        handshake.receive_data(_head(event))
        request = _describe(event)
        marked = any(name == _MARKER for name, _ in event.headers)
        if marked and not request.is_upgrade:
            return request
        answer = handshake.next_event()
        assert answer is not None  # (a whole head)
        return answer

    async def send(self, *events: h11.InformationalResponse | h11.Response | h11.Data
                   | h11.EndOfMessage) -> None:
        """Send our response events."""
        data = b"".join(self.conn.send(event) for event in events)
        await self.stream.send_all(data)


async def send_refusal(stream: trio.abc.Stream, response: bytes) -> None:
    """Send the answer to a refused request, end our side, and read what the client
    still sends until it closes, for a bounded time and size; the caller then closes.

    A close with unread bytes resets the connection, and a client still sending (a
    body, or a head too large) would lose the answer: its send fails first.
    """
    with trio.move_on_after(REFUSAL_LINGER_TIMEOUT):
        await stream.send_all(response)
        try:
            if isinstance(stream, PlainSocketStream) and not isinstance(stream, TLSSocketStream):
                stream.shutdown_write()  # (the answer ends here; TLS cannot say so)
            left = REFUSAL_LINGER_SIZE
            while left > 0:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    return
                left -= len(data)
        except trio.BrokenResourceError:  # (the client went away: nothing left to lose)
            return


def client_gave_up(stream: trio.abc.Stream, peer: str) -> bool:
    """Whether the client (``peer`` in the log) has already ended its side of the
    connection (or reset it), once its request is read: one poll, no wait; logged.

    A client waiting for its answer does not half-close; one that ended its side
    gave up (its handshake timeout ran out while the relay was stopped, and the
    kernel kept its request in the backlog): acting on the request would resume a
    session over a dead connection, or open one nobody uses. The FIN is a TCP
    state, seen under TLS too (whatever records, close_notify included, came
    before it). Linux only (POLLRDHUP); elsewhere only a reset is seen.
    """
    if not isinstance(stream, PlainSocketStream) or not hasattr(select, "poll"):
        return False  # (TLSSocketStream is a PlainSocketStream)
    poller = select.poll()
    poller.register(stream.socket, _GONE)
    if not poller.poll(0):
        return False
    log.info("%s: the client gave up before the answer; ignored", peer)
    return True


async def read_request(
    stream: trio.abc.Stream, handshake: ws.ServerHandshake
) -> ws.RequestReceived | ws.HandshakeFailed | HttpRequest | None:
    """Read until the request is complete (or, for the HTTP transports, its head);
    None when the client went away."""
    http: h11.Connection | None = h11.Connection(h11.SERVER,
                                                 max_incomplete_event_size=MAX_HEADER_SIZE)
    while True:
        event = handshake.next_event()
        if event is not None:
            return event
        data = await stream.receive_some(READ_SIZE)
        if not data:
            handshake.receive_eof()
            event = handshake.next_event()
            return event if isinstance(event, ws.HandshakeFailed) else None
        handshake.receive_data(data)
        if http is not None:
            http, request = _marked_request(http, data)
            if http is not None and request is not None:
                return HttpRequest(request, HttpReader(stream, http))


def _marked_request(conn: h11.Connection, data: bytes | bytearray
                    ) -> tuple[h11.Connection | None, ws.RequestReceived | None]:
    """Feed h11; (conn, the request) once a head with the transport marker is in;
    (None, None) once it is clear this is not one (the handshake answers it)."""
    conn.receive_data(bytes(data))
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None, None
    if event is h11.NEED_DATA:
        return conn, None
    if isinstance(event, h11.Request) and any(name == _MARKER for name, _ in event.headers):
        request = _describe(event)
        if not request.is_upgrade:
            return conn, request
    return None, None


def _head(request: h11.Request) -> bytes:
    """The request's head again, as h11 read it (the names as they were sent), without
    a body: the handshake would wait for one that h11 has (its chunks unframed), and
    the refusal that answers such a request reads and drops what is left."""
    lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
    lines += [name + b": " + value for name, value in request.headers.raw_items()
              if name.lower() not in _BODY_HEADERS]
    return b"\r\n".join([*lines, b"", b""])


def _describe(request: h11.Request) -> ws.RequestReceived:
    headers = decode_headers(request.headers)
    upgrade = ws.RequestReceived(request.method.decode("ascii", "replace"),
                                 request.target.decode("ascii", "replace"), headers,
                                 is_upgrade=False, upgrade_problem=None, subprotocols=[])
    is_upgrade = "websocket" in (upgrade.header("upgrade") or "").lower()
    return upgrade if not is_upgrade else ws.RequestReceived(
        upgrade.method, upgrade.target, headers, is_upgrade=True,
        upgrade_problem="an upgrade inside an HTTP-transport connection", subprotocols=[])
