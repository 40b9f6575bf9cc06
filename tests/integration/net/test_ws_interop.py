"""Interop: wstunnel.ws against the Python ``websockets`` library over loopback.

Our side is the small trio peer in ``tests/conformance/wsio.py``; the other
side is ``websockets.sync`` running in threads (no asyncio in our code, and a
thread per peer keeps each exchange deterministic). Text commands steer the
peers: ``ping-me`` makes the server ping and report the pong, ``close-me``
makes it close with 4001. Everything else is echoed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any, Final

import pytest
import trio
import websockets.exceptions as ws_errors
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import Server, ServerConnection, serve
from websockets.typing import Subprotocol

from tests.conformance.wsio import Peer, accept_server, open_client
from wstunnel.errors import HandshakeError
from wstunnel.ws import (
    SUBPROTOCOL,
    BytesMessage,
    CloseReceived,
    ConnectionClosed,
    Event,
    PingReceived,
    PongReceived,
    RequestReceived,
    ServerHandshake,
    TextMessage,
)

TIMEOUT: Final = 10.0
PEER_TIMEOUT: Final = 5.0
MAX_SIZE: Final = 4 << 20
SIZES: Final = (0, 125, 64 * 1024, 1 << 20)


def text_of_size(size: int) -> str:
    """A text whose UTF-8 form is exactly ``size`` bytes, with multi-byte chars."""
    pattern = "wstunnel é€ 𝄞 "
    raw = (pattern * (size // len(pattern.encode()) + 1)).encode()[:size]
    text = raw.decode("utf-8", errors="ignore")
    return text + "x" * (size - len(text.encode()))


def binary_of_size(size: int) -> bytes:
    """Bytes of every value, so no byte pattern is missed by masking."""
    return bytes(range(256)) * (size // 256) + bytes(range(size % 256))


# -- websockets as the server; our trio client --------------------------------------

def _ws_server_handler(record: queue.Queue[tuple[Any, ...]]) -> Callable[[ServerConnection],
                                                                         None]:
    def handler(ws: ServerConnection) -> None:
        record.put(("subprotocol", ws.subprotocol))
        try:
            for message in ws:
                if message == "ping-me":
                    record.put(("pong", ws.ping(b"srv").wait(PEER_TIMEOUT)))
                    ws.send("pinged")
                elif message == "close-me":
                    ws.close(4001, "server-bye")
                else:
                    ws.send(message)
        except ws_errors.ConnectionClosed as exc:
            record.put(("closed", exc.rcvd and exc.rcvd.code, exc.rcvd and exc.rcvd.reason))
            return
        record.put(("closed", ws.close_code, ws.close_reason))

    return handler


def _refuse_forbidden(ws: ServerConnection, request: Any) -> Any:
    if request.path == "/forbidden":
        return ws.respond(HTTPStatus.FORBIDDEN, "no tunnel for you\n")
    return None


@pytest.fixture
def ws_server() -> Iterator[tuple[int, queue.Queue[tuple[Any, ...]]]]:
    """A websockets echo server in a thread; yields (port, record of what it saw)."""
    record: queue.Queue[tuple[Any, ...]] = queue.Queue()
    server: Server = serve(_ws_server_handler(record), "127.0.0.1", 0,
                           subprotocols=[Subprotocol(SUBPROTOCOL)], max_size=MAX_SIZE,
                           process_request=_refuse_forbidden, ping_interval=None,
                           close_timeout=PEER_TIMEOUT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.socket.getsockname()[1], record
    finally:
        server.shutdown()
        thread.join(TIMEOUT)


async def _connect(port: int, path: str = "/tunnel") -> Peer:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        return await open_client(stream, f"127.0.0.1:{port}", path, subprotocol=SUBPROTOCOL,
                                 max_message_size=MAX_SIZE)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _next_message(peer: Peer) -> Event | None:
    """The next event that is not a ping/pong (those are answered inside)."""
    while True:
        event = await peer.next_event()
        if not isinstance(event, PingReceived | PongReceived):
            return event


async def _recorded(record: queue.Queue[tuple[Any, ...]], kind: str) -> tuple[Any, ...]:
    while True:
        item = await trio.to_thread.run_sync(record.get, True, PEER_TIMEOUT)
        if item[0] == kind:
            return item


@pytest.mark.parametrize("size", SIZES)
async def test_our_client_round_trips_messages(ws_server: tuple[int, Any], size: int) -> None:
    """Text and binary messages of 0 B to 1 MiB come back from websockets unchanged."""
    port, _ = ws_server
    with trio.fail_after(TIMEOUT):
        peer = await _connect(port)
        try:
            await peer.send_text(text_of_size(size))
            assert await _next_message(peer) == TextMessage(text_of_size(size))
            await peer.send_bytes(binary_of_size(size))
            assert await _next_message(peer) == BytesMessage(binary_of_size(size))
        finally:
            await trio.aclose_forcefully(peer.stream)


async def test_our_client_negotiates_subprotocol(ws_server: tuple[int, Any]) -> None:
    """Our client offers wstunnel.v1 and both sides agree on it."""
    port, record = ws_server
    with trio.fail_after(TIMEOUT):
        peer = await _connect(port)
        try:
            assert peer.subprotocol == SUBPROTOCOL
            assert await _recorded(record, "subprotocol") == ("subprotocol", SUBPROTOCOL)
        finally:
            await trio.aclose_forcefully(peer.stream)


async def test_our_client_ping_gets_pong(ws_server: tuple[int, Any]) -> None:
    """A ping we send comes back as a pong carrying the same payload."""
    port, _ = ws_server
    with trio.fail_after(TIMEOUT):
        peer = await _connect(port)
        try:
            await peer.ping(b"abc")
            assert await peer.next_event() == PongReceived(b"abc")
        finally:
            await trio.aclose_forcefully(peer.stream)


async def test_our_client_answers_server_ping(ws_server: tuple[int, Any]) -> None:
    """A ping from websockets is reported to us and answered with a pong it accepts."""
    port, record = ws_server
    with trio.fail_after(TIMEOUT):
        peer = await _connect(port)
        try:
            await peer.send_text("ping-me")
            assert await peer.next_event() == PingReceived(b"srv")
            assert await _next_message(peer) == TextMessage("pinged")
            assert await _recorded(record, "pong") == ("pong", True)
        finally:
            await trio.aclose_forcefully(peer.stream)


async def test_our_client_close_code_reaches_server(ws_server: tuple[int, Any]) -> None:
    """Our close(4000, "bye") arrives at websockets with that code and reason."""
    port, record = ws_server
    with trio.fail_after(TIMEOUT):
        peer = await _connect(port)
        try:
            await peer.close(4000, "bye")
            event = await _next_message(peer)
            while not isinstance(event, ConnectionClosed):
                event = await _next_message(peer)
            assert await _recorded(record, "closed") == ("closed", 4000, "bye")
        finally:
            await trio.aclose_forcefully(peer.stream)


async def test_server_close_code_reaches_our_client(ws_server: tuple[int, Any]) -> None:
    """websockets' close(4001, "server-bye") is reported to us, then the end."""
    port, _ = ws_server
    with trio.fail_after(TIMEOUT):
        peer = await _connect(port)
        try:
            await peer.send_text("close-me")
            assert await _next_message(peer) == CloseReceived(4001, "server-bye")
            closed = await _next_message(peer)
            assert isinstance(closed, ConnectionClosed)
            assert closed.code == 4001
            assert await peer.next_event() is None
        finally:
            await trio.aclose_forcefully(peer.stream)


async def test_our_client_reports_websockets_rejection(ws_server: tuple[int, Any]) -> None:
    """A 403 from websockets surfaces as HandshakeError with status 403."""
    port, _ = ws_server
    with trio.fail_after(TIMEOUT), pytest.raises(HandshakeError) as caught:
        await _connect(port, "/forbidden")
    assert caught.value.status == 403
    assert "403" in str(caught.value)


# -- our trio server; websockets as the client ---------------------------------------

def _decide(request: RequestReceived, handshake: ServerHandshake) -> bytes | None:
    if request.target == "/forbidden":
        return handshake.reject(403, "no tunnel for you")
    if not request.is_upgrade or request.upgrade_problem is not None:
        return handshake.default_response()
    return None


Closes = trio.MemorySendChannel[tuple[int, str]]


async def _serve_one(peer: Peer, closes: Closes) -> None:
    """Echo with commands; remember the close code/reason the client sent."""
    while (event := await peer.next_event()) is not None:
        if isinstance(event, CloseReceived):
            closes.send_nowait((event.code, event.reason))
        elif isinstance(event, TextMessage) and event.data == "ping-me":
            await peer.ping(b"srv")
        elif isinstance(event, PongReceived):
            await peer.send_text("pong:" + event.payload.decode())
        elif isinstance(event, TextMessage) and event.data == "close-me":
            await peer.close(4001, "server-bye")
        elif isinstance(event, TextMessage):
            await peer.send_text(event.data)
        elif isinstance(event, BytesMessage):
            await peer.send_bytes(event.data)


@pytest.fixture
async def our_server(
        nursery: trio.Nursery) -> tuple[int, trio.MemoryReceiveChannel[tuple[int, str]]]:
    """Our trio server on a free port; yields (port, close codes it received)."""
    closes, received_closes = trio.open_memory_channel[tuple[int, str]](100)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            peer = await accept_server(stream, subprotocol=SUBPROTOCOL,
                                       max_message_size=MAX_SIZE, decide=_decide)
            if peer is not None:
                await _serve_one(peer, closes)
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, handle, listeners)
    return listeners[0].socket.getsockname()[1], received_closes


def _ws_connect(port: int, path: str = "/tunnel") -> ClientConnection:
    return connect(f"ws://127.0.0.1:{port}{path}", subprotocols=[Subprotocol(SUBPROTOCOL)],
                   proxy=None, max_size=MAX_SIZE, open_timeout=PEER_TIMEOUT,
                   close_timeout=PEER_TIMEOUT, ping_interval=None)


def _in_thread(fn: Callable[[], Any]) -> Any:
    return trio.to_thread.run_sync(fn)


@pytest.mark.parametrize("size", SIZES)
async def test_websockets_client_round_trips_messages(our_server: tuple[int, Any],
                                                      size: int) -> None:
    """Our server echoes websockets' text and binary messages of 0 B to 1 MiB intact."""
    port, _ = our_server

    def exchange() -> list[Any]:
        with _ws_connect(port) as ws:
            ws.send(text_of_size(size))
            text = ws.recv(PEER_TIMEOUT)
            ws.send(binary_of_size(size))
            return [text, ws.recv(PEER_TIMEOUT)]

    with trio.fail_after(TIMEOUT):
        assert await _in_thread(exchange) == [text_of_size(size), binary_of_size(size)]


async def test_websockets_client_negotiates_subprotocol(our_server: tuple[int, Any]) -> None:
    """Our server selects wstunnel.v1 and declines the permessage-deflate offer."""
    port, _ = our_server

    def negotiated() -> tuple[str | None, str | None]:
        with _ws_connect(port) as ws:
            assert ws.response is not None
            return ws.subprotocol, ws.response.headers.get("Sec-WebSocket-Extensions")

    with trio.fail_after(TIMEOUT):
        assert await _in_thread(negotiated) == (SUBPROTOCOL, None)


async def test_websockets_client_pings_our_server(our_server: tuple[int, Any]) -> None:
    """Our server answers websockets' ping, and websockets answers ours."""
    port, _ = our_server

    def pings() -> tuple[bool, Any]:
        with _ws_connect(port) as ws:
            answered = ws.ping(b"cli").wait(PEER_TIMEOUT)
            ws.send("ping-me")
            return answered, ws.recv(PEER_TIMEOUT)

    with trio.fail_after(TIMEOUT):
        assert await _in_thread(pings) == (True, "pong:srv")


async def test_websockets_close_code_reaches_our_server(our_server: tuple[int, Any]) -> None:
    """websockets' close(4000, "bye") arrives at our server with that code and reason."""
    port, closes = our_server

    def close() -> None:
        with _ws_connect(port) as ws:
            ws.close(4000, "bye")

    with trio.fail_after(TIMEOUT):
        await _in_thread(close)
        assert await closes.receive() == (4000, "bye")


async def test_our_server_close_code_reaches_websockets(our_server: tuple[int, Any]) -> None:
    """Our close(4001, "server-bye") reaches websockets with that code and reason."""
    port, _ = our_server

    def closed_by_server() -> tuple[Any, Any]:
        with _ws_connect(port) as ws:
            ws.send("close-me")
            try:
                ws.recv(PEER_TIMEOUT)
            except ws_errors.ConnectionClosed as exc:
                assert exc.rcvd is not None
                return exc.rcvd.code, exc.rcvd.reason
            return None, None

    with trio.fail_after(TIMEOUT):
        assert await _in_thread(closed_by_server) == (4001, "server-bye")


async def test_websockets_client_sees_our_rejection(our_server: tuple[int, Any]) -> None:
    """Our server's 403 reaches websockets as InvalidStatus 403 with our text body."""
    port, _ = our_server

    def refused() -> tuple[int, bytes]:
        with pytest.raises(ws_errors.InvalidStatus) as caught:
            _ws_connect(port, "/forbidden")
        return caught.value.response.status_code, bytes(caught.value.response.body or b"")

    with trio.fail_after(TIMEOUT):
        status, body = await _in_thread(refused)
    assert status == 403
    assert b"no tunnel for you" in body


async def test_our_client_reports_our_server_rejection(our_server: tuple[int, Any]) -> None:
    """Our client reports our server's 403 as HandshakeError with status 403."""
    port, _ = our_server
    with trio.fail_after(TIMEOUT), pytest.raises(HandshakeError) as caught:
        await _connect(port, "/forbidden")
    assert caught.value.status == 403
    assert "403" in str(caught.value)


async def test_plain_get_gets_426_from_our_server(our_server: tuple[int, Any]) -> None:
    """A plain GET (no Upgrade) is answered 426 with Upgrade: websocket."""
    port, _ = our_server
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n")
            response = b""
            while chunk := await stream.receive_some(65536):
                response += chunk
        finally:
            await trio.aclose_forcefully(stream)
    head = response.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 426 ")
    assert b"\r\nupgrade: websocket" in head
