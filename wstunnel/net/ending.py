"""How a carried TCP connection ends: a clean close, or an abortive one (RST).

Only a clean half-close from the far end travels as FIN. Every other ending --
the session lost, the channel reset by the peer, a refused channel, a
shutdown past its drain time -- must reach the application as a failure, so
its socket is closed with ``SO_LINGER {1, 0}``: the kernel sends RST and the
application's next read fails with ECONNRESET instead of returning a clean,
and possibly truncated, end of stream.

A reset that follows data (the far end's destination sent bytes, then reset)
is passed on after those bytes: ``unsent_size`` tells when the kernel has put
them on the wire, since an abortive close discards what it has not sent.

Unix stream sockets have no RST, and Linux ignores ``SO_LINGER`` on them
(net/unix_socket.py): an abortive close there is a plain close, which the
peer sees as ``ECONNRESET`` only if it had sent bytes we had not read, and
otherwise as an end of stream after the bytes already written (those are in
its receive queue: nothing is ever unsent, ``unsent_size`` is 0). The agent's
accept loop and the relay's connect skip ``set_abortive`` (and net/sockopts.py's
TCP options) for them; the carriers' calls when they close one are harmless,
not effective.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
from typing import Final

import trio

__all__ = ["set_abortive", "clear_abortive", "unsent_size", "watch_all_sent", "abort_stream",
           "socket_of"]

_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
_LINGER_OFF: Final = struct.pack("ii", 0, 0)
#: ioctl for the bytes in a TCP socket's send queue not yet sent (Linux).
_SIOCOUTQNSD: Final = 0x894B
_TCP_NOTSENT_LOWAT: Final = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
#: How long an abort waits for data already written to leave the send queue
#: (trio streams only; the socket pump waits as long as the session lives).
SENT_WAIT_TIMEOUT: Final = 5.0


def set_abortive(sock: socket.socket | trio.socket.SocketType) -> None:
    """Make the next ``close`` send RST (a closed or broken socket is left as it is).

    Carried sockets are made abortive as soon as they are connected and only
    turned back (``clear_abortive``) for a clean close, so that even the
    kernel's close of a killed process's sockets is a reset, not a FIN.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)


def clear_abortive(sock: socket.socket | trio.socket.SocketType) -> None:
    """Undo ``set_abortive`` before a clean close: unsent data still goes, then FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)


def unsent_size(sock: socket.socket | trio.socket.SocketType) -> int:
    """Bytes written to ``sock`` that the kernel has not sent yet (0 where unknown)."""
    try:
        out = fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", out)[0])


def watch_all_sent(sock: socket.socket | trio.socket.SocketType) -> None:
    """From now on the socket polls writable only once everything written is sent
    (a low-water mark of one unsent byte), so a level-triggered wait for
    writability is a wait for the send queue to empty."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, 1)


def socket_of(stream: trio.abc.Stream) -> socket.socket | trio.socket.SocketType | None:
    """The socket under ``stream``: its own (``trio.SocketStream``, the ws:// and wss://
    streams of net/plain_stream.py and net/tls_stream.py), or the one under the stream
    it wraps (``trio.SSLStream.transport_stream``); None for a stream on no socket."""
    for _ in range(8):  # (a bound: wrappers of wrappers, never a cycle)
        sock = getattr(stream, "socket", None)
        if isinstance(sock, (socket.socket, trio.socket.SocketType)):
            return sock
        inner = getattr(stream, "transport_stream", None)
        if not isinstance(inner, trio.abc.Stream):
            return None
        stream = inner
    return None


async def abort_stream(stream: trio.abc.Stream, *, after_sent: bool = False) -> None:
    """Close ``stream`` with RST; with ``after_sent``, once what was written to it
    has left (bounded by SENT_WAIT_TIMEOUT). Streams without a socket just close;
    a stream already closed stays as it is."""
    sock = socket_of(stream)
    try:
        if sock is not None and after_sent and unsent_size(sock):
            watch_all_sent(sock)
            with trio.move_on_after(SENT_WAIT_TIMEOUT):
                while unsent_size(sock):
                    await _wait_writable(stream, sock)
    finally:  # (also when cancelled: a cancelled carrier must not look like a clean end)
        if sock is not None:
            set_abortive(sock)
        await trio.aclose_forcefully(stream)


async def _wait_writable(stream: trio.abc.Stream,
                         sock: socket.socket | trio.socket.SocketType) -> None:
    if isinstance(sock, trio.socket.SocketType):
        await sock.wait_writable()
    else:  # (the stream's own wait: a socket of net/plain_stream.py's streams)
        await stream.wait_send_all_might_not_block()
