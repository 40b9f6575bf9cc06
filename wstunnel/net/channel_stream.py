"""A multiplexed channel as a trio HalfCloseableStream.

Theory of operation: the transport's reader task dispatches mux events to the
channel (``_deliver``, ``_deliver_eof``, ``_break``, ``_wake_writable``); the
application calls the stream methods. Inbound bytes wait in a deque until read,
and credit goes back to the peer only when ``receive_some`` hands them over, so
a slow reader stops its sender and nothing else. ``send_all`` queues no more
than the peer's window allows and waits for WINDOW credit otherwise, so the
bytes held per channel follow the windows, not the traffic.
"""

from __future__ import annotations

import operator
from collections import deque
from typing import TYPE_CHECKING

import trio

from .._textforms import join_host_port

if TYPE_CHECKING:
    from .transport import TunnelTransport

__all__ = ["ChannelStream", "DEFAULT_RECEIVE_SIZE"]

DEFAULT_RECEIVE_SIZE = 256 * 1024


class _Busy:
    """Detects two tasks using the same direction at once (trio's rule)."""

    __slots__ = ("_held", "_what")

    def __init__(self, what: str) -> None:
        self._held = False
        self._what = what

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(f"another task is already {self._what} this channel")
        self._held = True

    def __exit__(self, *exc: object) -> None:
        self._held = False


class ChannelStream(trio.abc.HalfCloseableStream):
    """One tunnelled TCP connection; see the module docstring."""

    def __init__(self, transport: TunnelTransport, channel_id: int, host: str, port: int) -> None:
        self._transport = transport
        self.channel_id = channel_id
        self.host = host
        self.port = port
        self.bytes_sent = 0
        self.bytes_received = 0
        self._inbound: deque[bytes | memoryview] = deque()
        self._eof_received = False
        self._eof_sent = False
        self._closed = False
        self._mux_alive = True
        self._error: BaseException | None = None
        self._readable = trio.Event()
        self._writable = trio.Event()
        self._on_break: trio.CancelScope | None = None
        self._send_busy = _Busy("sending on")
        self._receive_busy = _Busy("receiving from")

    @property
    def destination(self) -> str:
        return join_host_port(self.host, self.port)

    # -- called by the transport ---------------------------------------------

    def _deliver(self, data: bytes | memoryview) -> None:
        if self._closed:
            self._reset("data arrived after the channel was closed")
            return
        self._inbound.append(data)
        self._readable.set()

    def _deliver_eof(self) -> None:
        self._eof_received = True
        self._readable.set()

    def _wake_writable(self) -> None:
        self._writable.set()

    def _forget(self) -> None:
        """The mux finished this channel; no more credit or frames for it."""
        self._mux_alive = False
        self._writable.set()
        self._readable.set()

    def _break(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._mux_alive = False
        self._readable.set()
        self._writable.set()
        if self._on_break is not None:
            self._on_break.cancel()

    # -- waiting helpers ------------------------------------------------------

    def cancel_on_break(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` once the channel is reset, refused or its session ends
        (at once if that already happened): a task-free way to stop its users."""
        if self._error is not None:
            scope.cancel()
        else:
            self._on_break = scope

    @property
    def error(self) -> BaseException | None:
        return self._error

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this channel was closed")

    # -- sending ---------------------------------------------------------------

    async def send_capacity(self) -> int:
        """Wait until the peer's window has room; return how many bytes fit."""
        while True:
            self._raise_if_closed()
            self._raise_if_broken()
            if not self._mux_alive:
                raise trio.BrokenResourceError("the channel is finished")
            capacity = self._transport.protocol.send_capacity(self.channel_id)
            if capacity > 0:
                return capacity
            self._writable = trio.Event()
            await self._writable.wait()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_busy:
            if self._eof_sent:
                self._raise_if_closed()
                raise trio.ClosedResourceError("send_eof() was already called")
            view = memoryview(data)
            sent_any = False
            while len(view):
                capacity = await self.send_capacity()
                sent_any = True
                size = min(capacity, len(view))
                piece = (
                    data if size == len(data) and isinstance(data, bytes) else bytes(view[:size])
                )
                self._transport.protocol.send_data(self.channel_id, piece)
                self.bytes_sent += size
                self._transport.wake_writer()
                view = view[size:]
            if not sent_any:
                self._raise_if_closed()
                self._raise_if_broken()
            await trio.sleep(0)

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_busy:
            await self.send_capacity()
            await trio.sleep(0)

    async def send_eof(self) -> None:
        with self._send_busy:
            self._raise_if_closed()
            if self._eof_sent:
                await trio.sleep(0)
                return
            self._raise_if_broken()
            self._eof_sent = True
            if self._mux_alive:
                self._transport.protocol.send_eof(self.channel_id)
                self._transport.wake_writer()
            await trio.sleep(0)

    # -- receiving -------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._receive_busy:
            if max_bytes is not None:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            while True:
                self._raise_if_closed()
                if self._inbound:
                    data = self._take(max_bytes)
                    await trio.sleep(0)
                    return data
                self._raise_if_broken()
                if self._eof_received:
                    await trio.sleep(0)
                    return b""
                self._readable = trio.Event()
                await self._readable.wait()

    def _take(self, max_bytes: int | None) -> bytes:
        """Up to ``max_bytes`` of queued chunks at once, so that the caller
        makes one socket write per read instead of one per 16 KiB chunk."""
        inbound = self._inbound
        limit = max_bytes or DEFAULT_RECEIVE_SIZE
        data = inbound.popleft()
        if inbound and len(data) < limit:
            parts = [data]
            size = len(data)
            while inbound and size + len(inbound[0]) <= limit:
                piece = inbound.popleft()
                parts.append(piece)
                size += len(piece)
            data = b"".join(parts)
        if len(data) > limit:
            inbound.appendleft(data[limit:])
            data = data[:limit]
        if type(data) is not bytes:
            data = bytes(data)  # one piece, a view of the received record
        size = len(data)
        self.bytes_received += size
        if self._mux_alive and self._error is None:
            self._transport.protocol.acknowledge(self.channel_id, size)
            self._transport.wake_writer()
        return data

    # -- closing -----------------------------------------------------------------

    async def aclose(self) -> None:
        """Close gracefully, as TCP's close() does.

        Queued data and a FIN still go out. Unread inbound data, or data that
        arrives later, resets the channel, so the peer's sender learns that
        nobody reads any more.
        """
        if not self._closed:
            self._closed = True
            if self._inbound:
                self._reset("closed with unread data")
            elif self._mux_alive and self._error is None and not self._eof_sent:
                self._eof_sent = True
                self._transport.protocol.send_eof(self.channel_id)
                self._transport.wake_writer()
            self._readable.set()
            self._writable.set()
        await trio.sleep(0)

    def abort(self, text: str = "the local connection failed") -> None:
        """Reset the channel now; queued data is dropped."""
        self._closed = True
        self._reset(text)
        self._readable.set()
        self._writable.set()

    def _reset(self, text: str) -> None:
        self._inbound.clear()
        if self._mux_alive and self._error is None:
            self._transport.protocol.reset_channel(self.channel_id, text=text)
            self._transport.wake_writer()
            self._mux_alive = False
