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
* The socket is closed once both directions are done, and only then with a
  FIN (net/ending.py). Every other ending is abortive (RST), so the local
  application sees a failure, never a clean and possibly truncated end: when
  the socket fails (the local side reset it: its bytes read before the reset
  still go out, then the channel's RESET), when the channel is refused, when
  the session ends before the channel did (a finished one still writes its
  last bytes: ``close_after_last_bytes``), and when the peer resets the channel -- that one
  after the DATA that preceded the RESET has been written and has left the
  kernel's send queue, as a TCP reset after data would arrive.

Everything runs in the trio thread: the pump's task and, for DATA, FIN and
WINDOW, the transport's reader task, between two of its checkpoints.

The pump knows its session as a ``ChannelHost`` (net/channel_stream.py): it
acts on a channel through the channel (credit back, FIN, reset), and after
each turn asks the host to dispatch what its actions produced and to wake the
writer. The two per-read calls, ``send_capacity`` and ``send_data``, go
straight to the sans-IO protocol it is given once, at construction: a hop
through the host per read would cost every chunk a method call.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, NoReturn

import trio

from ..errors import ChannelReset
from ..mux import ResetCode
from ..pieces import queue_piece
from .ending import clear_abortive, set_abortive, unsent_size, watch_all_sent
from .plain_stream import MAX_PIECES, Buffer, drop_sent

if TYPE_CHECKING:
    from ..protocol import TunnelProtocol
    from .channel_stream import ChannelHost, ChannelStream

__all__ = ["SocketPump", "AVAILABLE", "LastBytes", "READ_SIZE"]

log = logging.getLogger("wstunnel.session")

#: Where select.epoll is missing, agent and relay splice with two tasks per channel.
AVAILABLE: Final = hasattr(select, "epoll")
READ_SIZE: Final = 1024 * 1024
#: Ready sockets served per wake-up; the rest stay ready (level-triggered).
MAX_EVENTS: Final = 256
#: After its session ended, how long a finished channel's socket may take nothing of
#: the bytes it still holds before it is reset (``close_after_last_bytes``).
LAST_BYTES_TIMEOUT = 5.0

_IN: Final = getattr(select, "EPOLLIN", 1)
_OUT: Final = getattr(select, "EPOLLOUT", 4)
_TROUBLE: Final = getattr(select, "EPOLLERR", 8) | getattr(select, "EPOLLHUP", 16)


class SocketPump:
    """The sockets of one session's channels; see the module docstring."""

    def __init__(self, host: ChannelHost, protocol: TunnelProtocol) -> None:
        self._host = host
        self._protocol = protocol  # for send_capacity and send_data, once per read
        self._epoll = select.epoll()
        self._sockets: dict[int, _PumpedSocket] = {}
        self._dirty: list[_PumpedSocket] = []

    def attach(self, sock: socket.socket, channel: ChannelStream,
               on_finished: Callable[[], None], *, read_now: bool = False,
               reopen: Callable[[socket.socket], None] | None = None) -> None:
        """Carry ``channel`` over ``sock`` (non-blocking; now owned by the pump).

        ``on_finished`` is called once the socket is closed (possibly at once,
        if the channel is already broken). ``read_now``: read what the socket
        already holds now rather than on the pump's next turn (the caller
        wakes the session's writer). ``reopen``: if the peer refuses the channel
        with GOING_AWAY (``channel.retry``), the socket is handed to it, open and
        unread past what the channel took, instead of being reset; then
        ``on_finished`` is not called.
        """
        if sock.getblocking():
            sock.setblocking(False)
        pumped = _PumpedSocket(self, sock, channel, on_finished, reopen)
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
        host = self._host
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, events in epoll.poll(0, MAX_EVENTS):
                pumped = sockets.get(fd)
                if pumped is not None:
                    _guarded(pumped.ready, pumped, events)
            # A local EOF may have finished a channel (ChannelClosed): forget it now,
            # not when the next record happens to arrive.
            host.dispatch_local_events()
            host.wake_writer()

    def close_after_last_bytes(self, owner: LastBytes | None = None) -> None:
        """The session ended: ``close``, but the sockets of channels it had finished
        (both FINs passed) first write what they hold, then FIN. Their peer counts them
        done, and a relay that drains closes the session then, however much of the
        data still waits here for a slow reader: nothing failed, so it is delivered.
        A socket still reading for the gone session is reset at once. The rest is
        written in a system task of its own, so that neither the session's end nor the
        agent's next session waits for a slow reader; it resets them if none takes a
        byte for ``LAST_BYTES_TIMEOUT``, and when the process ends (``owner`` waits for
        it before: ``LastBytes``)."""
        for pumped in list(self._sockets.values()):
            if pumped._reading:
                pumped.finish(abort=True)
        if self._sockets:
            if owner is not None:
                owner.add(self)
            trio.lowlevel.spawn_system_task(self._write_last_bytes, owner,
                                            name="write finished channels' last bytes")
        else:
            self.close()

    async def _write_last_bytes(self, owner: LastBytes | None) -> None:
        try:
            while self._sockets:
                with trio.move_on_after(LAST_BYTES_TIMEOUT) as waiting:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                if waiting.cancelled_caught:
                    self._give_up(LAST_BYTES_TIMEOUT)
                    break
                self._serve_ready()
        except Exception:  # (a system task's error would end the process)
            log.exception("writing finished channels' last bytes failed; resetting them")
        finally:
            self.close()
            if owner is not None:
                owner.discard(self)

    def _serve_ready(self) -> None:
        for fd, events in self._epoll.poll(0, MAX_EVENTS):
            ready = self._sockets.get(fd)
            if ready is not None:
                _guarded(ready.ready, ready, events)

    def _give_up(self, idle_timeout: float) -> None:
        for pumped in self._sockets.values():
            log.warning("channel %d to %s: %s took none of its last bytes for %g s after "
                        "the session ended; resetting the connection", pumped.channel_id,
                        pumped._channel.destination, pumped._who(), idle_timeout)

    def close(self) -> None:
        """Reset every socket still here (the session is over), then close the epoll."""
        for pumped in list(self._sockets.values()):
            pumped.finish(abort=True)
        self._epoll.close()


class LastBytes:
    """One relay's or agent's pumps still writing finished channels' last bytes after
    their sessions ended (``close_after_last_bytes``): it waits for them (``wait``),
    within its drain time, before it exits, since the end of the process resets them."""

    def __init__(self) -> None:
        self._pumps: set[SocketPump] = set()
        self._none = trio.Event()

    def add(self, pump: SocketPump) -> None:
        self._pumps.add(pump)

    def discard(self, pump: SocketPump) -> None:
        self._pumps.discard(pump)
        if not self._pumps:
            self._none.set()

    async def wait(self) -> None:
        """Until none is left."""
        while self._pumps:
            if self._none.is_set():
                self._none = trio.Event()
            await self._none.wait()


def _guarded(method: Callable[..., None], pumped: _PumpedSocket, *args: int) -> None:
    """Each socket is a task root of its own: a bug in serving one channel resets
    that channel, not the session and its thousands of others."""
    try:
        method(*args)
    except Exception:
        log.error("carrying channel %d failed; resetting it", pumped.channel_id, exc_info=True)
        pumped.fail("internal error", ResetCode.INTERNAL_ERROR)


class _PumpedSocket:
    """One channel's local socket; a ``ChannelSink`` for its ChannelStream."""

    __slots__ = ("_pump", "_sock", "fd", "_channel", "_on_finished", "_reopen", "_mask",
                 "_reading", "_writing", "_fin_pending", "_pending", "_done", "_abort_when_sent")

    def __init__(self, pump: SocketPump, sock: socket.socket, channel: ChannelStream,
                 on_finished: Callable[[], None],
                 reopen: Callable[[socket.socket], None] | None = None) -> None:
        self._pump = pump
        self._sock = sock
        self.fd = sock.fileno()
        self._channel = channel
        self._on_finished = on_finished
        self._reopen = reopen  # (the owner's, for a refusal with GOING_AWAY: attach)
        self._mask = 0  # epoll events watched; 0 = not registered
        self._reading = True  # local -> channel, until the local EOF
        self._writing = True  # channel -> local, until its FIN is passed on
        self._fin_pending = False  # FIN arrived; shutdown once _pending is written
        self._pending: list[Buffer] | None = None
        self._done = False
        self._abort_when_sent = False  # the peer reset: RST once pending data has left

    # -- ChannelSink: called by the transport's reader task ----------------------

    def deliver(self, data: bytes | bytearray | memoryview) -> None:
        if self._done:
            return
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._pump._dirty.append(self)
        else:  # already dirty, or waiting for EPOLLOUT
            queue_piece(pending, data)

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
        """The channel is over but not cleanly: RST the socket. A reset by the peer
        waits for the DATA that came before it (already in ``_pending``, written by
        the next flush) to leave first; a refusal or a lost session does not."""
        if self._done:
            return
        if self._reopen is not None and self._channel.retry is not None:
            self._hand_back(self._reopen)
            return
        if not isinstance(self._channel.error, ChannelReset):
            self.finish(abort=True)
            return
        self._reading = self._fin_pending = False
        self._abort_when_sent = True
        watch_all_sent(self._sock)  # EPOLLOUT now means: nothing left unsent
        if self._pending is None:
            self._abort_if_sent()
        else:
            self.watch(_OUT)

    def _abort_if_sent(self) -> None:
        if unsent_size(self._sock):
            self.watch(_OUT)
        else:
            self.finish(abort=True)

    # -- called by the pump --------------------------------------------------------

    def ready(self, events: int) -> None:
        if events & (_IN | _TROUBLE) and self._mask & _IN:
            self._read()
        if events & (_OUT | _TROUBLE) and not self._done:
            if self._pending is not None:
                self.write()
            elif self._abort_when_sent:
                self._abort_if_sent()

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
        except OSError as exc:
            self.fail(f"{self._who()} reset the connection while we wrote to it ({exc})")
            return
        if sent:
            self._consumed(pending, sent)
        if self._pending is not None:
            self.watch(self._mask | _OUT)
        elif self._abort_when_sent:
            self._abort_if_sent()
        else:
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

    def _hand_back(self, reopen: Callable[[socket.socket], None]) -> None:
        """The channel was refused with GOING_AWAY before anything came back on it:
        the socket leaves the pump as it is (every byte read from it is in
        ``channel.retry``) for its owner to carry on another session."""
        self._done = True
        pump = self._pump
        del pump._sockets[self.fd]
        if self._mask and not pump._epoll.closed:
            pump._epoll.unregister(self.fd)
        reopen(self._sock)

    def finish(self, *, abort: bool = False) -> None:
        """Close the socket (with RST if ``abort``); tell the owner. Idempotent."""
        if self._done:
            return
        self._done = True
        self._pending = None
        pump = self._pump
        del pump._sockets[self.fd]
        if self._mask and not pump._epoll.closed:
            pump._epoll.unregister(self.fd)
        if abort:
            set_abortive(self._sock)
        else:
            clear_abortive(self._sock)
        self._sock.close()
        self._on_finished()

    # -- the two directions ----------------------------------------------------------

    def _read(self) -> None:
        channel = self._channel
        protocol = self._pump._protocol
        capacity = protocol.send_capacity(channel.channel_id)
        if capacity <= 0:  # credit_granted watches again
            self.watch(self._mask & ~_IN)
            return
        try:
            data = self._sock.recv(min(capacity, READ_SIZE))
        except BlockingIOError:
            return
        except OSError as exc:
            # What we read before the reset goes out first, then the RESET.
            self.fail(f"{self._who()} reset the connection ({exc.strerror or exc})",
                      after_data=True)
            return
        if data:
            protocol.send_data(channel.channel_id, data)
            channel.bytes_sent += len(data)
            return
        self._reading = False
        self.watch(self._mask & ~_IN)
        channel._send_eof_once()
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
        except OSError as exc:
            self.fail(f"{self._who()} reset the connection ({exc.strerror or exc})")
            return
        self._finish_if_both_done()

    def _finish_if_both_done(self) -> None:
        if not self._reading and not self._writing:
            self._channel._carried_to_end()
            self.finish()

    @property
    def channel_id(self) -> int:
        return self._channel.channel_id

    def _who(self) -> str:
        """Who is at the other end of this socket, for the reset's text."""
        return "the destination" if self._channel.accepted else "the local client"

    def fail(self, text: str, code: ResetCode = ResetCode.CONNECTION_RESET, *,
             after_data: bool = False) -> None:
        """The local socket failed: reset the channel, RST the socket."""
        self._channel.abort(text, code, after_data=after_data)
        self.finish(abort=True)
