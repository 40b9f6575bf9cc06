"""Socket options every carried or tunnelling TCP socket gets.

Unix sockets have neither option: callers skip these for them (they know the
kind without asking the socket), and a call on one only fails quietly.
"""

from __future__ import annotations

import contextlib
import socket

import trio

__all__ = ["NOTSENT_LOWAT", "tune_plain_socket", "tune_socket"]

NOTSENT_LOWAT = 16 * 1024
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


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
