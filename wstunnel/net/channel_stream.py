"""A multiplexed channel as a trio HalfCloseableStream.

Theory of operation: the transport's reader task dispatches mux events to the
channel (``_deliver``, ``_deliver_eof``, ``_break``, ``_wake_writable``); the
application calls the stream methods. Inbound bytes wait in a deque until read,
and credit goes back to the peer only when ``receive_some`` hands them over, so
a slow reader stops its sender and nothing else. ``send_all`` queues no more
than the peer's window allows and waits for WINDOW credit otherwise, so the
bytes held per channel follow the windows, not the traffic.

A channel carried by the session's socket pump (net/pump.py) is *attached*:
the dispatch hooks hand everything to its ``ChannelSink`` instead, and the
stream methods are not used any more. Per-channel memory matters (10,000 idle
channels): slots, and the deque and the Events exist only once needed.

A channel knows its session only as a ``ChannelHost``: the protocol actions on
one channel, each of which queues its record and wakes the session's writer
(``TunnelTransport`` implements it), so nothing here can forget the wake-up.
"""

from __future__ import annotations

import logging
import operator
from collections import deque
from typing import Protocol

import trio

from .. import mux
from ..addresses import join_host_port
from ..errors import ChannelReset
from ..mux import ChannelKind, ResetCode
from ..pieces import queue_piece

__all__ = ["ChannelStream", "ChannelHost", "ChannelSink", "DEFAULT_RECEIVE_SIZE", "OpenRetry",
           "until_ended"]

DEFAULT_RECEIVE_SIZE = 256 * 1024

log = logging.getLogger("wstunnel.session")


class ChannelHost(Protocol):
    """What a channel, and the socket pump carrying it, need from their session.

    Each action queues its record and wakes the session's writer, and is a
    no-op on a session that failed (it breaks its channels as it ends).
    """

    @property
    def name(self) -> str:
        """The session's name, for logs."""

    @property
    def role(self) -> mux.Role:
        """Our end of the session (which channels we opened follows from it)."""

    def send_capacity(self, channel: ChannelStream) -> int:
        """Bytes ``send_data`` may queue now (0: wait for ``_wake_writable``)."""

    def send_data(self, channel: ChannelStream, data: bytes) -> None:
        """Queue DATA, at most ``send_capacity``."""

    def send_eof(self, channel: ChannelStream) -> None:
        """Queue our FIN behind the data."""

    def reset(self, channel: ChannelStream, code: ResetCode, text: str, *,
              after_data: bool = False) -> bool:
        """Queue a RESET; False (nothing queued) when the session has failed."""

    def acknowledge(self, channel: ChannelStream, size: int) -> None:
        """``size`` received bytes were consumed: return their credit."""

    def wake_writer(self) -> None:
        """Output was queued outside these actions (the pump's reads)."""

    def dispatch_local_events(self) -> None:
        """Dispatch the events our own actions produced (a FIN that finished a channel)."""


_PATH_KINDS = frozenset({ChannelKind.UNIX, ChannelKind.UNIX_LISTEN})


class ChannelSink(Protocol):
    """Takes over an attached channel's dispatch hooks (see net/pump.py)."""

    def deliver(self, data: bytes | bytearray | memoryview) -> None: ...
    def deliver_eof(self) -> None: ...
    def credit_granted(self) -> None: ...
    def broken(self) -> None: ...


class ChannelStream(trio.abc.HalfCloseableStream):
    """One tunnelled TCP connection; see the module docstring."""

    __slots__ = ("_host", "channel_id", "host", "port", "kind", "forward", "bytes_sent",
                 "bytes_received", "_inbound", "_eof_received", "_eof_sent", "_closed",
                 "_mux_alive", "_error", "_readable", "_writable", "_on_break", "_sending",
                 "_receiving", "_sink", "_confirmed", "_open_waiter", "_retry")

    def __init__(self, session: ChannelHost, channel_id: int, host: str, port: int,
                 kind: int = ChannelKind.TCP, forward: str | None = None) -> None:
        self._host = session
        self.channel_id = channel_id
        self.host = host
        self.port = port
        #: The OPEN's kind (mux.ChannelKind), and the name of the forward it serves
        #: (for logs, metrics and the access log; None where no forward is known).
        self.kind = kind
        self.forward = forward
        self.bytes_sent = 0
        self.bytes_received = 0
        self._inbound: deque[bytes | bytearray | memoryview] | None = None
        self._eof_received = False
        self._eof_sent = False
        self._closed = False
        self._mux_alive = True
        self._error: BaseException | None = None
        self._readable: trio.Event | None = None  # made by the waiter, set by the dispatcher
        self._writable: trio.Event | None = None
        self._on_break: trio.CancelScope | None = None
        self._sending = False
        self._receiving = False
        self._sink: ChannelSink | None = None
        self._confirmed = False  # the peer's OPEN_OK arrived
        self._open_waiter: trio.Event | None = None  # only while someone waits for it
        self._retry: OpenRetry | None = None  # refused with GOING_AWAY: ``retry``

    @property
    def destination(self) -> str:
        """``host:port``, or ``unix:/path`` for a unix socket kind, as logs name it."""
        if self.kind in _PATH_KINDS:
            return f"unix:{self.host}"
        return join_host_port(self.host, self.port)

    @property
    def session(self) -> ChannelHost:
        """The session carrying this channel (its transport), e.g. to key per-session facts."""
        return self._host

    @property
    def accepted(self) -> bool:
        """True when the peer opened this channel (we dialled its destination)."""
        opened_by_agent = bool(self.channel_id & 1)
        return opened_by_agent is (self._host.role is mux.Role.RELAY)

    # -- called by the transport ---------------------------------------------

    def _deliver(self, data: bytes | memoryview) -> None:
        if self._sink is not None:
            self._sink.deliver(data)
            return
        if self._closed:
            self._reset("data arrived after the channel was closed")
            return
        if self._inbound is None:
            self._inbound = deque()
        queue_piece(self._inbound, data)
        self._wake_readable()

    def _deliver_eof(self) -> None:
        self._eof_received = True
        if self._sink is not None:
            self._sink.deliver_eof()
        self._wake_readable()

    def _opened(self) -> None:
        """The peer accepted our OPEN (OPEN_OK)."""
        self._confirmed = True
        if self._open_waiter is not None:
            self._open_waiter.set()

    def _wake_writable(self) -> None:
        if self._sink is not None:
            self._sink.credit_granted()
        elif self._writable is not None:
            self._writable.set()

    def _wake_readable(self) -> None:
        if self._readable is not None:
            self._readable.set()

    def _forget(self) -> None:
        """The mux finished this channel; no more credit or frames for it."""
        self._mux_alive = False
        self._wake_all()

    def _break(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._mux_alive = False
        self._wake_readable()
        if self._writable is not None:
            self._writable.set()
        if self._open_waiter is not None:
            self._open_waiter.set()
        if self._on_break is not None and not self.reading_before_reset:
            self._on_break.cancel()
        if self._sink is not None:
            self._sink.broken()

    # -- attaching to the socket pump ------------------------------------------

    def _attach(self, sink: ChannelSink) -> None:
        """From now on ``sink`` gets the dispatch hooks; what was queued for the
        reader (data that arrived before the local socket was ready) goes first."""
        self._sink = sink
        if self._error is not None:
            sink.broken()
            return
        inbound, self._inbound = self._inbound, None
        for data in inbound or ():
            sink.deliver(data)
        if self._eof_received:
            sink.deliver_eof()

    def _acknowledge(self, size: int) -> None:
        """``size`` received bytes were consumed: count them, return the credit."""
        self.bytes_received += size
        if self._mux_alive and self._error is None:
            self._host.acknowledge(self, size)

    def _send_eof_once(self) -> None:
        """Our side is done sending (the application, or the pump's socket reached
        EOF): FIN, once, while the channel is still alive."""
        if not self._eof_sent:
            self._eof_sent = True
            if self._mux_alive and self._error is None:
                self._host.send_eof(self)

    def _carried_to_end(self) -> None:
        """The pump finished both directions cleanly: closed, as after ``aclose()``."""
        self._closed = True

    # -- waiting helpers ------------------------------------------------------

    def cancel_on_break(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` once the channel is reset, refused or its session ends
        (at once if that already happened): a task-free way to stop its users."""
        if self._error is not None:
            scope.cancel()
        else:
            self._on_break = scope

    async def wait_opened(self) -> None:
        """Wait until the peer has connected this channel's destination (OPEN_OK).

        Only for those that must know before going on (a SOCKS or HTTP proxy
        answers its client then); the others send at once (early data).

        Raises:
            trio.BrokenResourceError: refused (``__cause__`` is the
                ``ChannelRefused`` with the relay's reason), reset, or the session
                ended first.
        """
        while not self._confirmed:
            self._raise_if_broken()
            self._open_waiter = waiter = trio.Event()
            await waiter.wait()
        self._open_waiter = None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def retry(self) -> OpenRetry | None:
        """Set when the peer refused our OPEN with GOING_AWAY (its session was going
        away and it never acted on the OPEN): what to send on a channel opened
        again on another session, so that the local side never notices."""
        return self._retry

    def _refused_for_retry(self, error: BaseException, retry: OpenRetry) -> None:
        """Like ``_break``, for a refusal that may be retried: ``retry`` is set first,
        so whoever the break wakes sees it."""
        self._retry = retry
        self._break(error)

    @property
    def reading_before_reset(self) -> bool:
        """The peer reset the channel, and what it sent before may not all have been
        read: the reader gets that data first, then the error, so nobody should be
        cancelled before it does (``cancel_on_break`` waits for the reader)."""
        return (isinstance(self._error, ChannelReset) and not self._eof_received
                and not self._closed)

    def _raise_if_broken(self) -> None:
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this channel was closed")

    def _claim(self, sending: bool) -> None:
        """trio's rule: one task per direction at a time."""
        if sending:
            if self._sending:
                raise trio.BusyResourceError("another task is already sending on this channel")
            self._sending = True
        else:
            if self._receiving:
                raise trio.BusyResourceError(
                    "another task is already receiving from this channel")
            self._receiving = True

    # -- sending ---------------------------------------------------------------

    async def send_capacity(self) -> int:
        """Wait until the peer's window has room; return how many bytes fit."""
        while True:
            self._raise_if_closed()
            self._raise_if_broken()
            if not self._mux_alive:
                raise trio.BrokenResourceError("the channel is finished")
            capacity = self._host.send_capacity(self)
            if capacity > 0:
                return capacity
            self._writable = writable = trio.Event()
            await writable.wait()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._claim(True)
        try:
            await self._send_all(data)
        finally:
            self._sending = False

    async def _send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            self._raise_if_closed()
            raise trio.ClosedResourceError("send_eof() was already called")
        view = memoryview(data)
        sent_any = False
        while len(view):
            capacity = await self.send_capacity()
            sent_any = True
            size = min(capacity, len(view))
            piece = data if size == len(data) and isinstance(data, bytes) else bytes(view[:size])
            self._host.send_data(self, piece)
            self.bytes_sent += size
            view = view[size:]
        if not sent_any:
            self._raise_if_closed()
            self._raise_if_broken()
        await trio.sleep(0)

    async def wait_send_all_might_not_block(self) -> None:
        self._claim(True)
        try:
            await self.send_capacity()
            await trio.sleep(0)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        self._claim(True)
        try:
            self._raise_if_closed()
            if not self._eof_sent:
                self._raise_if_broken()
                self._send_eof_once()
            await trio.sleep(0)
        finally:
            self._sending = False

    # -- receiving -------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._claim(False)
        try:
            if max_bytes is not None:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            return await self._receive_some(max_bytes)
        finally:
            self._receiving = False

    async def _receive_some(self, max_bytes: int | None) -> bytes:
        while True:
            self._raise_if_closed()
            if self._inbound:
                data = self._take(self._inbound, max_bytes)
                await trio.sleep(0)
                return data
            self._raise_if_broken()
            if self._eof_received:
                await trio.sleep(0)
                return b""
            self._readable = readable = trio.Event()
            await readable.wait()

    def _take(self, inbound: deque[bytes | bytearray | memoryview], max_bytes: int | None) -> bytes:
        """Up to ``max_bytes`` of queued chunks at once, so that the caller
        makes one socket write per read instead of one per 16 KiB chunk."""
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
        self._acknowledge(len(data))
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
            else:
                self._send_eof_once()
            self._wake_all()
        await trio.sleep(0)

    def abort(self, text: str, code: ResetCode = ResetCode.CONNECTION_RESET, *,
              after_data: bool = False) -> None:
        """Reset the channel now (the peer's side gets RST): queued data is dropped,
        or with ``after_data`` sent first, as when a local socket sent bytes and then
        reset."""
        self._closed = True
        self._reset(text, code, after_data=after_data)
        self._wake_all()

    def _wake_all(self) -> None:
        self._wake_readable()
        if self._writable is not None:
            self._writable.set()

    def _reset(self, text: str, code: ResetCode = ResetCode.CANCELLED, *,
               after_data: bool = False) -> None:
        self._inbound = None
        if (self._mux_alive and self._error is None
                and self._host.reset(self, code, text, after_data=after_data)):
            log.info("%s: channel %d to %s reset: %s", self._host.name, self.channel_id,
                     self.destination, text)
            self._mux_alive = False


class OpenRetry:
    """The bytes a channel refused with GOING_AWAY had taken, to send on the channel
    that replaces it. The mux hands them back (``ChannelOpenFailed.retry_data``: at
    most one window); a splice that read bytes it could no longer give adds them
    (``keep``). An EOF needs no keeping: a local socket at its end reports it again
    on the next read from it."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)

    def keep(self, data: bytes | memoryview) -> None:
        """Bytes read from the local side after the refusal, before the reader knew."""
        self.data += data


async def until_ended(channel: ChannelStream) -> None:
    """Wait until a channel that carries no data (a reverse forward's lease) ends:
    reset, refused, closed here, or its session gone."""
    try:
        while await channel.receive_some():
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
