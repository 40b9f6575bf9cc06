"""Carry bytes between local TCP sockets and their channels with no task per channel.

Theory of operation: one ``SocketPump`` per session owns a private
``select.epoll`` on which every attached socket is registered, and one task
that waits until that epoll descriptor is readable and then serves whatever is
ready. An idle channel therefore costs a socket, an epoll registration (kernel
memory) and two small objects, instead of two trio tasks (a task parked in
``receive_some`` is ~4.8 KiB of Python objects; 10,000 idle channels).
Waiting on our own epoll descriptor needs ``trio.lowlevel.wait_readable``:
the one use of ``trio.lowlevel`` in wstunnel, confined to ``SocketPump.run``.

Per socket (``_PumpedSocket``), level-triggered:

* local -> channel: EPOLLIN is watched while the local side has not sent EOF
  and the channel has send credit. A readable socket is ``recv``'d up to the
  credit (at most ``READ_SIZE``) and the bytes are queued with ``send_data``,
  so a channel never holds more than its window, however fast the local
  socket is. No credit: EPOLLIN is dropped until WINDOW credit arrives
  (``credit_granted``). EOF becomes the channel's FIN.
* channel -> local: DATA chunks are collected per socket while the transport
  dispatches one read's events, then written with one ``send``/``sendmsg``
  (``flush``). What the kernel takes is acknowledged (credit back to the
  peer); the rest waits with EPOLLOUT watched. The peer never has more than
  the window in flight, so what waits here is bounded by the window too. The
  channel's FIN becomes ``shutdown(SHUT_WR)`` once nothing waits.
* The socket is closed once both directions are done; at once, and the
  channel reset, when the socket fails (e.g. the local side reset it, or
  closed it with our data unread); at once when the channel is reset or
  refused (after discarding unread input, so a refusal is a FIN, not a
  reset), or the session ends.

Everything runs in the trio thread: the pump's task and, for DATA, FIN and
WINDOW, the transport's reader task, between two of its checkpoints.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, NoReturn

import trio

from ..errors import ChannelRefused
from .plain_stream import MAX_PIECES, Buffer, drop_sent

if TYPE_CHECKING:
    from .channel_stream import ChannelStream
    from .transport import TunnelTransport

__all__ = ["SocketPump", "AVAILABLE", "READ_SIZE"]

log = logging.getLogger("wstunnel.session")

#: Where select.epoll is missing, agent and relay splice with two tasks per channel.
AVAILABLE: Final = hasattr(select, "epoll")
READ_SIZE: Final = 1024 * 1024
#: Ready sockets served per wake-up; the rest stay ready (level-triggered).
MAX_EVENTS: Final = 256
#: Reads of READ_SIZE a refused channel's socket is drained with before closing.
MAX_DISCARD_READS: Final = 16

_IN: Final = getattr(select, "EPOLLIN", 1)
_OUT: Final = getattr(select, "EPOLLOUT", 4)
_TROUBLE: Final = getattr(select, "EPOLLERR", 8) | getattr(select, "EPOLLHUP", 16)


class SocketPump:
    """The sockets of one session's channels; see the module docstring."""

    def __init__(self, transport: TunnelTransport) -> None:
        self._transport = transport
        self._epoll = select.epoll()
        self._sockets: dict[int, _PumpedSocket] = {}
        self._dirty: list[_PumpedSocket] = []

    def attach(self, sock: socket.socket, channel: ChannelStream,
               on_finished: Callable[[], None], *, read_now: bool = False) -> None:
        """Carry ``channel`` over ``sock`` (non-blocking; now owned by the pump).

        ``on_finished`` is called once the socket is closed (possibly at once,
        if the channel is already broken). ``read_now``: read what the socket
        already holds now rather than on the pump's next turn (the caller
        wakes the transport's writer).
        """
        if sock.getblocking():
            sock.setblocking(False)
        pumped = _PumpedSocket(self, sock, channel, on_finished)
        self._sockets[pumped.fd] = pumped
        pumped.watch(_IN)
        channel._attach(pumped)
        if read_now and not pumped._done:
            _guarded(pumped.ready, pumped, _IN)
        self.flush()

    def flush(self) -> None:
        """Write what DATA brought since the last flush (the transport calls this
        after dispatching each read's events)."""
        dirty = self._dirty
        if dirty:
            self._dirty = []
            for pumped in dirty:
                _guarded(pumped.write, pumped)

    async def run(self) -> NoReturn:
        """Serve ready sockets until cancelled (with the session)."""
        epoll = self._epoll
        sockets = self._sockets
        transport = self._transport
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, events in epoll.poll(0, MAX_EVENTS):
                pumped = sockets.get(fd)
                if pumped is not None:
                    _guarded(pumped.ready, pumped, events)
            # A local EOF may have finished a channel (ChannelClosed): forget it now,
            # not when the next record happens to arrive.
            transport.dispatch_local_events()
            transport.wake_writer()

    def close(self) -> None:
        """Close every socket still here (the session is over), then the epoll."""
        for pumped in list(self._sockets.values()):
            pumped.finish()
        self._epoll.close()


def _guarded(method: Callable[..., None], pumped: _PumpedSocket, *args: int) -> None:
    """Each socket is a task root of its own: a bug in serving one channel resets
    that channel, not the session and its thousands of others."""
    try:
        method(*args)
    except Exception:
        log.error("carrying channel %d failed; resetting it", pumped.channel_id, exc_info=True)
        pumped.fail("internal error")


class _PumpedSocket:
    """One channel's local socket; a ``ChannelSink`` for its ChannelStream."""

    __slots__ = ("_pump", "_sock", "fd", "_channel", "_on_finished", "_mask", "_reading",
                 "_writing", "_fin_pending", "_pending", "_done")

    def __init__(self, pump: SocketPump, sock: socket.socket, channel: ChannelStream,
                 on_finished: Callable[[], None]) -> None:
        self._pump = pump
        self._sock = sock
        self.fd = sock.fileno()
        self._channel = channel
        self._on_finished = on_finished
        self._mask = 0  # epoll events watched; 0 = not registered
        self._reading = True  # local -> channel, until the local EOF
        self._writing = True  # channel -> local, until its FIN is passed on
        self._fin_pending = False  # FIN arrived; shutdown once _pending is written
        self._pending: list[Buffer] | None = None
        self._done = False

    # -- ChannelSink: called by the transport's reader task ----------------------

    def deliver(self, data: bytes | memoryview) -> None:
        if self._done:
            return
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._pump._dirty.append(self)
        else:  # already dirty, or waiting for EPOLLOUT
            pending.append(data)

    def deliver_eof(self) -> None:
        if self._done:
            return
        self._fin_pending = True
        if self._pending is None:
            self._shutdown()

    def credit_granted(self) -> None:
        if self._reading and not self._done and not self._mask & _IN:
            self.watch(self._mask | _IN)

    def broken(self) -> None:
        if not self._done and isinstance(self._channel.error, ChannelRefused):
            self._discard_unread()
        self.finish()

    def _discard_unread(self) -> None:
        """Drop what the local side sent that we had not read yet, so that closing
        sends it a FIN rather than a reset: a refused channel ends as a plain close
        (the relay refuses a loopback destination before we have even read the
        first bytes the local side sent behind its connect)."""
        for _ in range(MAX_DISCARD_READS):
            try:
                if not self._sock.recv(READ_SIZE):
                    return
            except OSError:  # (BlockingIOError: nothing more)
                return

    # -- called by the pump --------------------------------------------------------

    def ready(self, events: int) -> None:
        if events & (_IN | _TROUBLE) and self._mask & _IN:
            self._read()
        if events & (_OUT | _TROUBLE) and self._pending is not None and not self._done:
            self.write()

    def write(self) -> None:
        """Hand what is pending to the kernel; watch EPOLLOUT for the rest."""
        pending = self._pending
        if pending is None or self._done:
            return
        try:
            if len(pending) == 1:
                sent = self._sock.send(pending[0])
            else:
                sent = self._sock.sendmsg(pending[:MAX_PIECES])
        except BlockingIOError:
            sent = 0
        except OSError:
            self.fail("the local connection failed while we wrote to it")
            return
        if sent:
            self._consumed(pending, sent)
        if self._pending is not None:
            self.watch(self._mask | _OUT)
            return
        self.watch(self._mask & ~_OUT)
        if self._fin_pending:
            self._shutdown()

    def watch(self, mask: int) -> None:
        if mask == self._mask:
            return
        epoll = self._pump._epoll
        if not self._mask:
            epoll.register(self.fd, mask)
        elif not mask:
            epoll.unregister(self.fd)
        else:
            epoll.modify(self.fd, mask)
        self._mask = mask

    def finish(self) -> None:
        """Close the socket; tell the owner. Idempotent."""
        if self._done:
            return
        self._done = True
        self._pending = None
        pump = self._pump
        del pump._sockets[self.fd]
        if self._mask and not pump._epoll.closed:
            pump._epoll.unregister(self.fd)
        self._sock.close()
        self._on_finished()

    # -- the two directions ----------------------------------------------------------

    def _read(self) -> None:
        channel = self._channel
        protocol = channel._transport.protocol
        capacity = protocol.send_capacity(channel.channel_id)
        if capacity <= 0:  # credit_granted watches again
            self.watch(self._mask & ~_IN)
            return
        try:
            data = self._sock.recv(min(capacity, READ_SIZE))
        except BlockingIOError:
            return
        except OSError:
            self.fail("the local connection failed")
            return
        if data:
            protocol.send_data(channel.channel_id, data)
            channel.bytes_sent += len(data)
            return
        self._reading = False
        self.watch(self._mask & ~_IN)
        if not channel._eof_sent:
            channel._eof_sent = True
            # (a failed session has forgotten its channels; it breaks them as it ends)
            if channel._mux_alive and channel.error is None and protocol.failure is None:
                protocol.send_eof(channel.channel_id)
        self._finish_if_both_done()

    def _consumed(self, pending: list[Buffer], sent: int) -> None:
        """Drop ``sent`` bytes from the front of ``pending``; return their credit."""
        drop_sent(pending, sent)
        if not pending:
            self._pending = None
        self._channel._acknowledge(sent)

    def _shutdown(self) -> None:
        self._fin_pending = False
        self._writing = False
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.fail("the local connection failed")
            return
        self._finish_if_both_done()

    def _finish_if_both_done(self) -> None:
        if not self._reading and not self._writing:
            self._channel._closed = True  # as after ChannelStream.aclose()
            self.finish()

    @property
    def channel_id(self) -> int:
        return self._channel.channel_id

    def fail(self, text: str) -> None:
        self._channel.abort(text)
        self.finish()
