"""Opening the WebSocket to the relay, and reading an upgrade on the relay.

Every failure here becomes a ``HandshakeError`` (or ``SessionClosed``) whose
text says, in one line, what came back and what it means, because this is the
step that fails when a proxy or firewall sits in the way.
"""

from __future__ import annotations

import socket
import ssl

import trio

from .. import ws
from ..config import RelayURL
from ..errors import AuthenticationError, HandshakeError

__all__ = [
    "tune_socket",
    "open_websocket",
    "read_request",
]

READ_SIZE = 65536
NOTSENT_LOWAT = 16 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def tune_socket(stream: trio.abc.Stream, *, notsent_lowat: bool) -> None:
    """TCP_NODELAY always; TCP_NOTSENT_LOWAT on the WebSocket's socket (Linux).

    The low-water mark keeps bulk data out of the kernel send buffer, where it
    would sit in front of an interactive channel's bytes.
    """
    if not isinstance(stream, trio.SocketStream):
        return
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        if notsent_lowat:
            stream.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    except OSError:
        pass  # not supported on this platform: a tuning, not a requirement


async def open_websocket(
    relay: RelayURL,
    *,
    headers: list[tuple[str, str]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[trio.abc.Stream, bytes]:
    """Connect, wrap in TLS for wss://, upgrade; return (stream, trailing bytes).

    The caller bounds the whole thing with a timeout.

    Raises:
        HandshakeError: with a one-line explanation (AuthenticationError on 401/403).
        OSError: the TCP connection itself failed.
    """
    tcp = await trio.open_tcp_stream(relay.host, relay.port)
    tune_socket(tcp, notsent_lowat=True)
    stream: trio.abc.Stream = tcp
    try:
        if relay.secure:
            context = ssl_context or ssl.create_default_context()
            stream = trio.SSLStream(
                tcp, context, server_hostname=server_hostname or relay.host, https_compatible=True
            )
            await stream.do_handshake()
        trailing = await _upgrade(stream, relay, headers or [])
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, trailing


async def _upgrade(
    stream: trio.abc.Stream, relay: RelayURL, headers: list[tuple[str, str]]
) -> bytes:
    handshake = ws.ClientHandshake(relay.host_header, relay.path, extra_headers=headers)
    await stream.send_all(handshake.data_to_send())
    while True:
        event = handshake.next_event()
        if isinstance(event, ws.HandshakeAccepted):
            return event.trailing_data
        if isinstance(event, ws.HandshakeRejected):
            raise _rejection(relay, event)
        data = await stream.receive_some(READ_SIZE)
        if data:
            handshake.receive_data(data)
        else:
            handshake.receive_eof()


def _rejection(relay: RelayURL, event: ws.HandshakeRejected) -> HandshakeError:
    where = f"{relay.url}"
    if event.status in (401, 403):
        return AuthenticationError(f"{where} {event.message}", event.status)
    hint = {
        0: "the connection closed before an HTTP answer: is this the relay's address, "
        "and does the path pass WebSocket upgrades?",
        200: "something on the path answered like a web server; it does not pass upgrades",
        400: "the relay or a proxy in front of it rejected the upgrade request",
        404: "nothing is served at that path: check the URL's path (the relay's --path)",
        426: "the path to the relay does not pass WebSocket upgrades (Upgrade headers stripped?)",
        502: "a proxy in front of the relay could not reach it: is the relay running?",
        503: "a proxy in front of the relay has no relay available",
        505: "a proxy on the path speaks HTTP/1.0 to the relay: enable HTTP/1.1 and Upgrade",
    }.get(event.status)
    text = f"{where} {event.message}"
    if hint:
        text += f" — {hint}"
    return HandshakeError(text, event.status)


async def read_request(
    stream: trio.abc.Stream, handshake: ws.ServerHandshake
) -> ws.RequestReceived | ws.HandshakeFailed | None:
    """Read until the request is complete; None when the client went away."""
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
