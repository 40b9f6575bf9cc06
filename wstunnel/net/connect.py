"""Opening the WebSocket to the relay, and reading an upgrade on the relay.

Every failure here becomes a ``HandshakeError`` (or ``SessionClosed``) whose
text says, in one line, what came back and what it means, because this is the
step that fails when a proxy or firewall sits in the way.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

from .. import tls, ws
from ..config import RelayURL
from ..errors import AuthenticationError, HandshakeError
from .explain import explain_rejection
from .plain_stream import take_over
from .tls_stream import TLSSocketStream, start_tls

__all__ = [
    "tune_socket",
    "tune_plain_socket",
    "open_websocket",
    "read_request",
]

READ_SIZE = 65536
NOTSENT_LOWAT = 16 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)

#: Opens the TCP byte pipe to (host, port): directly, or through a proxy (net/proxy.py).
Dialer = Callable[[str, int], Awaitable[trio.SocketStream]]


def tune_socket(stream: trio.abc.Stream, *, notsent_lowat: bool) -> None:
    """TCP_NODELAY always; TCP_NOTSENT_LOWAT on the WebSocket's socket (Linux).

    The low-water mark keeps bulk data out of the kernel send buffer, where it
    would sit in front of an interactive channel's bytes.
    """
    if isinstance(stream, trio.SocketStream):
        tune_plain_socket(stream.socket, notsent_lowat=notsent_lowat)


def tune_plain_socket(sock: socket.socket | trio.socket.SocketType, *,
                      notsent_lowat: bool) -> None:
    """``tune_socket`` for a socket (the agent's accepted ones, the relay's dialled ones).

    The agent's accepted local connections keep the 16 KiB low-water mark that
    trio's ``SocketStream`` gave them: without it the 64 B round trip under a
    bulk upload rose 6-13 %. On the relay's destination sockets it cost bulk
    uploads 16-24 % (docs/PERFORMANCE.md).
    """
    with contextlib.suppress(OSError):  # a tuning, not a requirement (e.g. not TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        if notsent_lowat:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)


async def open_websocket(
    relay: RelayURL,
    *,
    headers: list[tuple[str, str]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    dial: Dialer | None = None,
    host_header: str | None = None,
    pin: str | None = None,
) -> tuple[trio.abc.Stream, bytes]:
    """Connect, wrap in TLS for wss://, upgrade; return (stream, trailing bytes).

    ``dial`` replaces the direct TCP connection (e.g. a ``ProxyDialer``).
    ``server_hostname`` replaces the URL's host in SNI, certificate checks and
    the Host header; ``host_header`` replaces only the Host header (shared
    front ends, CDNs); ``pin`` is a ``sha256:`` fingerprint the relay's
    certificate must have (checked before any HTTP is sent). The caller bounds
    the whole thing with a timeout.

    Raises:
        HandshakeError: with a one-line explanation (AuthenticationError on 401/403,
            tls.CertificateMismatch for a wrong pin).
        OSError: the TCP connection itself failed.
    """
    tcp = await (dial or trio.open_tcp_stream)(relay.host, relay.port)
    tune_socket(tcp, notsent_lowat=True)
    stream: trio.abc.Stream = tcp
    if server_hostname is not None:
        relay = relay._replace(host=server_hostname)  # what SNI and Host carry
    try:
        stream = (await _start_tls(tcp, relay, ssl_context, pin) if relay.secure
                  else take_over(tcp))
        trailing = await _upgrade(stream, relay, headers or [], host_header)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, trailing


async def _start_tls(
    tcp: trio.SocketStream, relay: RelayURL, context: ssl.SSLContext | None, pin: str | None
) -> TLSSocketStream:
    context = context or tls.client_context(tls.ClientTLS())
    try:
        stream = await start_tls(tcp, context, server_hostname=relay.host)
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise HandshakeError(
                f"{relay.url}: {tls.describe_verify_error(cause, relay.host)}"
            ) from exc
        if isinstance(cause, ssl.SSLError):
            raise HandshakeError(f"{relay.url}: TLS handshake failed: {cause}") from exc
        raise
    if pin is not None:
        try:
            tls.check_pin(stream.getpeercert(binary_form=True), pin, relay.url)
        except BaseException:
            stream.close()
            raise
    return stream


async def _upgrade(
    stream: trio.abc.Stream, relay: RelayURL, headers: list[tuple[str, str]],
    host_header: str | None = None,
) -> bytes:
    host = host_header or relay.host_header
    handshake = ws.ClientHandshake(host, relay.path, extra_headers=headers)
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
    return HandshakeError(explain_rejection(where, event), event.status)


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
