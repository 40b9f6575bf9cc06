"""A trio Stream whose bytes are carried by HTTP requests: the two ends of a pipe.

Theory of operation: over a WebSocket a session's bytes come and go on one
connection; over the HTTP transports they come in request or response
bodies, on connections that come and go. A ``BytePipe`` sits between: the
session's ``TunnelTransport`` reads and writes it as its ``trio.abc.Stream``;
the code making the requests (the relay's handlers, the agent's polling loops)
``feed``s it what arrived and ``take``s what is to leave. Both directions are
bounded: whoever feeds a full pipe (``max_buffered_size``) waits (which holds
the peer's upload back), and ``send_all`` waits, as a socket's would, until the
bytes to leave are back within ``outbound_limit``. Those bytes have left the
multiplexer's fair order (an interactive record written after them waits for
them to cross the link), so the relay keeps that bound to what its link
carries in a few tens of milliseconds (net/pipe_sizing.py); waiting after
the write, not only before it, is what tells the session's writer how fast
the link drains (its write size then shrinks as on a slow socket).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Final

import trio

__all__ = ["BytePipe", "Buffer", "DEFAULT_BUFFERED_SIZE", "write_parts"]

#: What each direction holds at most before its writer waits.
DEFAULT_BUFFERED_SIZE: Final = 4 * 1024 * 1024

Buffer = bytes | bytearray | memoryview


class BytePipe(trio.abc.Stream):
    """A session's stream whose bytes come and go through request bodies: see above."""

    #: Whether the requests carrying it are encrypted (status and the dashboard say so);
    #: whoever makes the requests sets it.
    tls = False

    def __init__(self, *, max_buffered_size: int = DEFAULT_BUFFERED_SIZE) -> None:
        self.max_buffered_size = max_buffered_size
        #: What the bytes to leave may come to before ``send_parts`` returns (or
        #: ``wait_send_all_might_not_block`` does); the relay adapts it to its link.
        self.outbound_limit = max_buffered_size
        self._inbound: collections.deque[bytes] = collections.deque()  # as fed: no copies
        self._inbound_size = 0
        self._inbound_eof = False
        self._outbound: list[Buffer] = []
        self._outbound_size = 0
        self._broken: str | None = None
        self._closed = False
        self._changed = trio.Event()

    # -- state shared by both ends ------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._closed or self._broken is not None

    def break_(self, reason: str) -> None:
        """The requests can no longer carry the session: the transport's next read
        or write fails with ``reason``."""
        if self._broken is None and not self._closed:
            self._broken = reason
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait(self) -> None:
        await self._changed.wait()

    # -- trio.abc.Stream: the session's TunnelTransport reads and writes ------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            self._check()
            if self._inbound:
                data = self._inbound.popleft()
                if max_bytes is not None and len(data) > max_bytes:
                    data, rest = data[:max_bytes], data[max_bytes:]
                    self._inbound.appendleft(rest)
                self._inbound_size -= len(data)
                self._notify()
                await trio.sleep(0)
                return data
            if self._inbound_eof:
                await trio.sleep(0)
                return b""
            await self._wait()

    async def send_all(self, data: Buffer) -> None:
        await self.send_parts([bytes(data)])

    async def send_parts(self, parts: Sequence[Buffer]) -> None:
        """Queue ``parts`` for the downstream requests (not joined) once there is room;
        return once the bytes to leave are within ``outbound_limit`` again (or the
        pipe has ended), as a socket's ``send_all`` returns once its buffer took them."""
        await self.wait_send_all_might_not_block()
        self._outbound.extend(parts)
        self._outbound_size += sum(map(len, parts))
        self._notify()
        while not self.ended and self._outbound_size > self.outbound_limit:
            await self._wait()

    async def wait_send_all_might_not_block(self) -> None:
        while True:
            self._check()
            if self._outbound_size < self.outbound_limit:
                await trio.sleep(0)
                return
            await self._wait()

    async def aclose(self) -> None:
        self._closed = True
        self._notify()
        await trio.sleep(0)

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the session's stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)

    # -- the requests' end: what they carried up, what they are to carry down ----

    async def feed(self, data: bytes) -> bool:
        """Add upstream bytes once there is room; False (nothing added) once ended."""
        while not self.ended and self._inbound_size >= self.max_buffered_size:
            await self._wait()
        if self.ended:
            return False
        if data:
            self._inbound.append(data)
            self._inbound_size += len(data)
        self._notify()
        return True

    async def wait_for_room(self) -> None:
        """Wait until ``feed`` would not wait (or the pipe has ended): fetch no more
        than the reader can take."""
        while not self.ended and self._inbound_size >= self.max_buffered_size:
            await self._wait()

    def feed_eof(self) -> None:
        """The agent ended its upstream on purpose: the transport reads EOF."""
        self._inbound_eof = True
        self._notify()

    async def take(self, max_size: int, timeout: float = float("inf")) -> list[Buffer]:
        """Downstream bytes, at most ``max_size`` (more than nothing once any is
        queued); [] after ``timeout`` with nothing queued, or once ended and drained."""
        with trio.move_on_after(timeout):
            while not self._outbound and not self.ended:
                await self._wait()
        return self._take_now(max_size)

    def _take_now(self, max_size: int) -> list[Buffer]:
        taken: list[Buffer] = []
        size = 0
        outbound = self._outbound
        while outbound and size < max_size:
            part = outbound[0]
            room = max_size - size
            if len(part) > room:
                view = memoryview(part)
                taken.append(view[:room])
                outbound[0] = view[room:]
                size += room
                break
            taken.append(outbound.pop(0))
            size += len(part)
        if taken:
            self._outbound_size -= size
            self._notify()
        return taken

    async def wait_drained(self) -> None:
        """Wait until every byte written has been taken."""
        while self._outbound:
            await self._wait()


async def write_parts(stream: trio.abc.Stream, parts: list[Buffer]) -> None:
    """Write ``parts`` (an HTTP body's chunks, either end of the HTTP transports)
    unjoined where the stream can (``send_parts``), else joined."""
    send_parts = getattr(stream, "send_parts", None)
    if send_parts is not None:
        await send_parts(parts)
    else:
        await stream.send_all(b"".join(parts))
