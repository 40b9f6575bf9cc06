"""ws:// sessions on a bare non-blocking socket instead of ``trio.SocketStream``.

Every ``trio.SocketStream`` call passes a conflict detector, an error
translator and trio's generic try-then-wait helper, each a context manager or
coroutine of its own in Python. A session has exactly one reader and one
writer task, so none of that buys anything here; calling the socket directly
took ws:// sequential churn from 1169 to 1297 connections a second and CPU
per 1000 connections from 0.86 to 0.78 s (five interleaved pairs,
docs/PERFORMANCE.md). Semantics are trio's: every call checkpoints, a close
wakes a blocked reader or writer with ``ClosedResourceError``, a failed socket
raises ``BrokenResourceError`` caused by the ``OSError``. The wss:// twin is
``tls_stream.TLSSocketStream``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

import trio

__all__ = ["MAX_PIECES", "PlainSocketStream", "drop_sent", "nowait_sender", "take_over"]

#: receive_some without max_bytes.
DEFAULT_RECEIVE_SIZE = 65536
#: Pieces per sendmsg (well under IOV_MAX).
MAX_PIECES: Final = 64

Buffer = bytes | bytearray | memoryview
_A = TypeVar("_A")
_R = TypeVar("_R")


def drop_sent(pieces: list[Buffer], sent: int) -> None:
    """Remove the first ``sent`` bytes from ``pieces`` (what a gathering send took)."""
    whole = 0
    while sent:
        size = len(pieces[whole])
        if size > sent:
            pieces[whole] = memoryview(pieces[whole])[sent:]
            break
        sent -= size
        whole += 1
    del pieces[:whole]


def take_over(tcp: trio.SocketStream) -> PlainSocketStream:
    """Move ``tcp``'s socket into a ``PlainSocketStream`` (``tcp`` is unusable afterwards)."""
    sock = socket.socket(fileno=tcp.socket.detach())
    sock.setblocking(False)
    return PlainSocketStream(sock)


def nowait_sender(stream: trio.abc.Stream) -> Callable[[Sequence[Buffer]], list[Buffer]] | None:
    """``stream.send_nowait`` for a stream on a socket of ours (plain, or TLS, which
    has its own); None for any other (the HTTP transports' pipe, a memory stream)."""
    if isinstance(stream, PlainSocketStream):
        return stream.send_nowait
    return None


class PlainSocketStream(trio.abc.Stream):
    """A trio Stream over a non-blocking ``socket.socket``."""

    #: Names the stream in errors.
    _what = "connection"

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._closed = False
        #: The last read took less than it asked for: the kernel had nothing more.
        self._drained = False
        #: ``wait_receivable`` waited: the next read is no checkpoint of its own.
        self._waited = False

    @property
    def socket(self) -> socket.socket:
        """The socket, as ``trio.SocketStream.socket``: for its options (an abortive
        close, net/ending.py), never to read or write around the stream."""
        return self._sock

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        size = max_bytes if max_bytes is not None else DEFAULT_RECEIVE_SIZE
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        data = await self._read(self._sock.recv, size)
        self._drained = len(data) < size
        return data

    async def receive_into(self, buffer: memoryview) -> int:
        """Like ``receive_some``, into ``buffer``: bytes read (0 at EOF)."""
        if not len(buffer):
            raise ValueError("the buffer is empty")
        got = await self._read(self._sock.recv_into, buffer)
        self._drained = got < len(buffer)
        return got

    async def wait_receivable(self) -> None:
        """Before a read, when the last one left the kernel's buffer empty: wait for
        bytes first, instead of a read that fails (a system call and an exception).

        For a reader that expects nothing soon: an idle session's reader after a
        ping, once per wake-up on a relay with many idle agents (issue 22). The read
        that follows is then no checkpoint of its own; when the last read did not
        drain the buffer this returns at once and is none either.
        """
        if self._drained:
            self._check_open()
            await trio.lowlevel.wait_readable(self._sock)
            self._waited = True

    async def _read(self, read: Callable[[_A], _R], arg: _A) -> _R:
        self._check_open()
        sock = self._sock
        waited, self._waited = self._waited, False
        while True:
            try:
                result = read(arg)
                break
            except BlockingIOError:
                waited = True  # (the wait was this call's checkpoint)
                await trio.lowlevel.wait_readable(sock)
            except OSError as exc:
                raise self._broken(exc) from exc
        if not waited:
            await trio.lowlevel.checkpoint()
        return result

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_parts((data,))

    async def send_parts(self, parts: Sequence[Buffer], *, checkpoint: bool = True) -> None:
        """``send_all`` of the parts joined, without joining them (``sendmsg``).

        ``checkpoint=False``: no checkpoint at the end when the kernel took it all
        at once, for a writer whose next step is a wait or a checkpoint of its own
        (the session's writer: one scheduler round less per write, net/transport.py).
        """
        self._check_open()
        sock = self._sock
        pieces: list[Buffer] = [part for part in parts if len(part)]
        waited = False
        try:
            while pieces:
                try:
                    sent = sock.sendmsg(pieces[:MAX_PIECES])
                except BlockingIOError:
                    waited = True
                    await trio.lowlevel.wait_writable(sock)
                    continue
                drop_sent(pieces, sent)
        except OSError as exc:
            raise self._broken(exc) from exc
        if checkpoint and not waited:
            await trio.lowlevel.checkpoint()

    def send_nowait(self, parts: Sequence[Buffer]) -> list[Buffer]:
        """Hand the kernel what it takes of ``parts`` now, without waiting or a
        checkpoint; returns what it did not take (empty: all sent), which must go
        before anything else sent later. Lets a task write while the stream's writer
        is parked (the session reader's pong, net/transport.py: no writer wake-up)."""
        self._check_open()
        sock = self._sock
        pieces: list[Buffer] = [part for part in parts if len(part)]
        try:
            while pieces:
                drop_sent(pieces, sock.sendmsg(pieces[:MAX_PIECES]))
        except BlockingIOError:
            return pieces  # (the kernel's buffer is full)
        except OSError as exc:
            raise self._broken(exc) from exc
        return pieces

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.wait_writable(self._sock)

    def shutdown_write(self) -> None:
        """Send FIN after what was written, and go on reading: the peer sees the end of
        an answer while it still sends (a refusal's linger, relay/upgrade.py). Not for
        TLS: there a FIN without close_notify reads as a truncation."""
        self._check_open()
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._broken(exc) from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"the {self._what} was closed")

    def _broken(self, exc: BaseException) -> Exception:
        if self._closed:
            return trio.ClosedResourceError(f"the {self._what} was closed")
        return trio.BrokenResourceError(f"{self._what} failed: {exc}")
