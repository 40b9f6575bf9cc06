"""Trio glue that drives the sans-IO ``wstunnel.ws`` objects over a real stream.

Theory of operation: the conformance peers (Autobahn echo server and client)
and the interop tests need a WebSocket on a socket, but the product's own
transport lives in ``net/`` and speaks the multiplexer. This module is the
smallest honest adapter: one task per connection reads from the stream,
feeds ``receive_data``/``receive_eof``, flushes ``data_to_send()`` at once and
hands events out one by one. When the connection says
``should_close_transport`` it flushes and drops TCP; a client whose close
handshake finished cleanly first waits (briefly) for the server to drop TCP,
as RFC 6455 §7.1.1 asks of clients. Nothing here is used by the product.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Final

import trio

from wstunnel.errors import HandshakeError
from wstunnel.ws import (
    BytesMessage,
    ClientHandshake,
    ConnectionClosed,
    ConnectionState,
    Event,
    HandshakeAccepted,
    HandshakeFailed,
    RequestReceived,
    Role,
    ServerHandshake,
    TextMessage,
    WebSocketConnection,
)

__all__ = [
    "RECEIVE_SIZE",
    "CLIENT_CLOSE_WAIT_TIMEOUT",
    "Peer",
    "open_client",
    "accept_server",
    "echo",
]

#: Large reads keep per-call overhead low for the 16 MiB messages of case 9.
RECEIVE_SIZE: Final = 1 << 18
#: How long a client waits for the server to drop TCP after a clean close.
CLIENT_CLOSE_WAIT_TIMEOUT: Final = 2.0

#: Decides whether to accept a request: return a full HTTP response to refuse.
Decider = Callable[[RequestReceived, ServerHandshake], "bytes | None"]


class Peer:
    """One WebSocket over one trio stream, driven by a single task.

    Attributes:
        conn: the sans-IO connection (inspect ``state``, ``close_code``...).
        subprotocol: what the handshake settled on.
    """

    def __init__(self, stream: trio.abc.Stream, conn: WebSocketConnection, role: Role,
                 subprotocol: str | None = None) -> None:
        self.stream = stream
        self.conn = conn
        self.role = role
        self.subprotocol = subprotocol
        self._events: collections.deque[Event] = collections.deque()
        self._done = False

    async def flush(self) -> None:
        """Write whatever the connection queued; a dead socket counts as EOF."""
        data = self.conn.data_to_send()
        if not data or self._done:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._lost()

    async def send_text(self, text: str) -> None:
        """Send one text message and flush it."""
        self.conn.send_text(text)
        await self.flush()

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary message and flush it."""
        self.conn.send_bytes(data)
        await self.flush()

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping; its pong arrives later as ``PongReceived``."""
        self.conn.ping(payload)
        await self.flush()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; read on to see ``ConnectionClosed``."""
        self.conn.close(code, reason)
        await self.flush()

    async def next_event(self) -> Event | None:
        """Return the next event, reading as needed; ``None`` once TCP is gone."""
        while not self._events:
            if self._done:
                return None
            await self._read_once()
        return self._events.popleft()

    async def _read_once(self) -> None:
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self.conn.receive_data(data)
        else:
            self._lost()
        await self.process_input()

    async def process_input(self) -> None:
        """Collect events, write replies, drop TCP if the connection says so.

        Also call this once right after construction: bytes that trailed the
        handshake were already parsed by the connection's constructor.
        """
        self._events.extend(self.conn.events_received())
        await self.flush()
        if self.conn.should_close_transport and not self._done:
            await self._drop_transport()

    def _lost(self) -> None:
        """The peer's TCP ended: tell the connection once, stop reading."""
        if not self._done:
            self._done = True
            self.conn.receive_eof()
            self._events.extend(self.conn.events_received())

    async def _drop_transport(self) -> None:
        # RFC 6455 §7.1.1: the server drops TCP first; a client that finished a
        # clean close waits a little for that before dropping it itself.
        if self.role is Role.CLIENT and self.conn.failure is None:
            with trio.move_on_after(CLIENT_CLOSE_WAIT_TIMEOUT):
                while await self._discard_some():
                    pass
        self._done = True
        await trio.aclose_forcefully(self.stream)

    async def _discard_some(self) -> bool:
        try:
            return bool(await self.stream.receive_some(RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False


async def _read_handshake_input(stream: trio.abc.Stream,
                                handshake: ClientHandshake | ServerHandshake) -> None:
    try:
        data = await stream.receive_some(RECEIVE_SIZE)
    except trio.BrokenResourceError:
        data = b""
    if data:
        handshake.receive_data(bytes(data))  # a SocketStream gives bytes: no copy
    else:
        handshake.receive_eof()


async def open_client(stream: trio.abc.Stream, host: str, path: str, *,
                      subprotocol: str | None, max_message_size: int,
                      extra_headers: Sequence[tuple[str, str]] = ()) -> Peer:
    """Run the client handshake on ``stream`` and return the open WebSocket.

    Raises:
        HandshakeError: the server refused; ``.status`` is its HTTP status
            (0 when no valid response came), the message its one-line summary.
    """
    handshake = ClientHandshake(host, path, subprotocol=subprotocol,
                                extra_headers=extra_headers)
    await stream.send_all(handshake.data_to_send())
    event = handshake.next_event()
    while event is None:
        await _read_handshake_input(stream, handshake)
        event = handshake.next_event()
    if not isinstance(event, HandshakeAccepted):
        raise HandshakeError(event.message, status=event.status)
    conn = WebSocketConnection(Role.CLIENT, max_message_size=max_message_size,
                               trailing_data=event.trailing_data)
    peer = Peer(stream, conn, Role.CLIENT, event.subprotocol)
    await peer.process_input()
    return peer


def default_decider(request: RequestReceived, handshake: ServerHandshake) -> bytes | None:
    """Accept every WebSocket upgrade; answer anything else the standard way."""
    if not request.is_upgrade or request.upgrade_problem is not None:
        return handshake.default_response()
    return None


async def accept_server(stream: trio.abc.Stream, *, subprotocol: str | None,
                        max_message_size: int,
                        decide: Decider = default_decider) -> Peer | None:
    """Run the server handshake; return the WebSocket, or ``None`` if refused.

    ``decide`` sees the parsed request and may return a complete HTTP
    response (e.g. ``handshake.reject(403)``) to refuse it.
    """
    handshake = ServerHandshake(subprotocol=subprotocol)
    event = handshake.next_event()
    while event is None:
        await _read_handshake_input(stream, handshake)
        event = handshake.next_event()
    if isinstance(event, HandshakeFailed):
        await stream.send_all(event.response)
        return None
    refusal = decide(event, handshake)
    if refusal is not None:
        await stream.send_all(refusal)
        return None
    await stream.send_all(handshake.accept())
    conn = WebSocketConnection(Role.SERVER, max_message_size=max_message_size,
                               trailing_data=handshake.trailing_data)
    chosen = subprotocol if subprotocol in event.subprotocols else None
    peer = Peer(stream, conn, Role.SERVER, chosen)
    await peer.process_input()
    return peer


async def echo(peer: Peer) -> None:
    """Echo text and binary messages until the connection ends.

    A message that arrived in the same read as the peer's close frame is not
    echoed: our close reply is already queued and RFC 6455 §5.5.1 forbids
    data frames after it.
    """
    while True:
        event = await peer.next_event()
        if event is None or isinstance(event, ConnectionClosed):
            return
        if peer.conn.state is not ConnectionState.OPEN:
            continue
        if isinstance(event, TextMessage):
            await peer.send_text(event.data)
        elif isinstance(event, BytesMessage):
            await peer.send_bytes(event.data)
