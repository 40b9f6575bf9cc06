"""``-D``: the dynamic forward kind, a SOCKS5/SOCKS4a/HTTP proxy whose destinations
the relay connects.

Each connection gets a task: read the request (socks.py), open a channel to
the named destination (the relay resolves the name, so its policy applies to
the name and its addresses), send what the client sent after its request
right behind the OPEN, wait for the relay's answer, reply, then carry the
connection like any other channel (the socket pump where there is one). The
client hears "connected" only once the relay has connected, and a refusal
in its own protocol's words (SOCKS5 0x02 not allowed, HTTP 403, ...).
A SOCKS5 UDP ASSOCIATE is served by socks_udp.py instead, for as long as
its connection lasts.
"""

from __future__ import annotations

import logging
import socket
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

from ..errors import ChannelRefused
from ..mux import OpenFailure
from ..net.ending import abort_stream, clear_abortive
from .request_body import RequestBody
from .socks import ProxyFailed, ProxyHandshake, ProxyRequest, Users
from .socks_udp import serve_association

if TYPE_CHECKING:
    from ..config import Forward
    from ..net.channel_stream import ChannelStream
    from .kinds import ChannelOpener, Rest

__all__ = ["DynamicForward", "HANDSHAKE_TIMEOUT", "OPEN_TIMEOUT"]

log = logging.getLogger("wstunnel.agent")

#: A client that has not finished its request by then is dropped.
HANDSHAKE_TIMEOUT: Final = 30.0
#: The longest wait for the relay's answer to an OPEN (its connect_timeout is shorter).
OPEN_TIMEOUT: Final = 60.0
_RECEIVE_SIZE: Final = 16 * 1024
#: What a connection that ends before it is carried may raise in its task.
_ENDED: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class DynamicForward:
    """``-D [bind:]port``: each client names its destination (SOCKS5, SOCKS4a, HTTP)."""

    def connection(self, forward: Forward, sock: socket.socket,
                   opener: ChannelOpener) -> Rest | None:
        return partial(_serve_client, forward.users, sock, opener, forward.label,
                       forward.udp_idle_timeout)


async def _serve_client(users: Users | None, sock: socket.socket,
                        opener: ChannelOpener, label: str, udp_idle_timeout: float) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    handshake = ProxyHandshake(users)
    channel: ChannelStream | None = None
    try:
        request = await _read_request(stream, handshake)
        if request is None:
            return await _close_after_reply(stream, handshake)
        if request.udp_associate:
            return await serve_association(stream, handshake, request, opener, label,
                                           udp_idle_timeout)
        channel = await _open(opener, request, handshake, label)
        if channel is None:
            return await _close_after_reply(stream, handshake)
        await stream.send_all(handshake.data_to_send())
    except _ENDED as exc:
        log.debug("proxy client went away before its channel was carried: %r", exc)
        if channel is not None:
            channel.abort("the proxy client went away")
        await abort_stream(stream)
        return
    except BaseException:
        if channel is not None:
            channel.abort("the agent is stopping")
        await abort_stream(stream)
        raise
    if request.body is None:
        await opener.carry_channel(channel, stream)
    else:  # (a plain HTTP request: its body, not a pipelined request after it)
        await opener.carry_channel(channel, _OneRequest(stream, request.body))


class _OneRequest(trio.abc.HalfCloseableStream):
    """A plain HTTP request's client side: the rest of its body reaches the
    destination; what follows it (a pipelined request, perhaps for another host and
    with the client's proxy login) is read and dropped until the client closes. The
    destination was sent ``Connection: close``, so its answer ends the exchange and
    the client sends what went unanswered again, on a new connection."""

    def __init__(self, stream: trio.SocketStream, body: RequestBody) -> None:
        self._stream = stream
        self._body = body
        self.socket = stream.socket  # (for the access log and an abortive close)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while data := await self._stream.receive_some(max_bytes):
            if self._body.done:
                continue
            try:
                kept = self._body.take(data)
            except ValueError as exc:
                log.info("HTTP proxy client: %s; resetting its connection", exc)
                raise trio.BrokenResourceError(str(exc)) from exc
            if kept:
                return kept
        return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _read_request(stream: trio.SocketStream,
                        handshake: ProxyHandshake) -> ProxyRequest | None:
    """The client's request; None when it failed (the reply to send is queued) or
    did not come within ``HANDSHAKE_TIMEOUT``."""
    with trio.move_on_after(HANDSHAKE_TIMEOUT):
        while True:
            event = handshake.next_event()
            if event is None:
                reply = handshake.data_to_send()  # (SOCKS5 method choice, login answer)
                if reply:
                    await stream.send_all(reply)
            if isinstance(event, ProxyRequest):
                return event
            if isinstance(event, ProxyFailed):
                log.info("proxy client refused: %s", event.reason)
                return None
            data = await stream.receive_some(_RECEIVE_SIZE)
            if data:
                handshake.receive_data(data)
            else:
                handshake.receive_eof()
    log.info("proxy client sent no complete request within %g s", HANDSHAKE_TIMEOUT)
    return None


async def _open(opener: ChannelOpener, request: ProxyRequest, handshake: ProxyHandshake,
                label: str) -> ChannelStream | None:
    """The channel to the request's destination, connected; None: the refusal is
    queued for the client. A channel refused because its relay was going away
    (the relay never acted on it) is opened again on the next session, each time
    waiting for one as a new connection would: the client hears nothing of it."""
    while True:
        channel = await opener.open_channel(request.host, request.port, forward=label)
        if channel is None:  # (no session, or the open was refused at once: logged)
            handshake.reply_refused(None)
            return None
        if await _opened(channel, request, handshake):
            return channel
        if channel.retry is None:
            return None
        log.info("%s request for %s: its relay went away before connecting it; opened "
                 "again on the new session", request.protocol.value, channel.destination)


async def _opened(channel: ChannelStream, request: ProxyRequest,
                  handshake: ProxyHandshake) -> bool:
    """Send the early bytes, wait for the relay's answer, queue the reply; True:
    connected. False with ``channel.retry`` set: refused as its relay went away,
    nothing queued (``_open`` tries again)."""
    reason: int | None = OpenFailure.TIMEOUT
    with trio.move_on_after(OPEN_TIMEOUT):
        try:
            if request.early:
                await channel.send_all(request.early)
            await channel.wait_opened()
        except trio.BrokenResourceError as exc:
            if channel.retry is not None:
                return False
            refused = exc.__cause__
            reason = refused.reason if isinstance(refused, ChannelRefused) else None
            log.warning("%s request for %s: the relay did not connect: %s",
                        request.protocol.value, channel.destination, refused or exc)
        else:
            handshake.reply_opened()
            return True
    if reason == OpenFailure.TIMEOUT:
        channel.abort("no answer from the relay in time")
    handshake.reply_refused(reason)
    return False


async def _close_after_reply(stream: trio.SocketStream, handshake: ProxyHandshake) -> None:
    """Send the queued refusal and close cleanly, so the client reads it (an abortive
    close could discard it)."""
    reply = handshake.data_to_send()
    if reply:
        await stream.send_all(reply)
        clear_abortive(stream.socket)
        with trio.move_on_after(1):
            await stream.send_eof()
            # (wait for the client to close: closing with its bytes unread would RST)
            while await stream.receive_some(_RECEIVE_SIZE):
                pass
        await stream.aclose()
    else:
        await abort_stream(stream)
