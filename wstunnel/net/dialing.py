"""Connecting to one of several addresses, raced (RFC 8305), with abortive sockets.

Why our own and not ``trio.open_tcp_stream``: a carried connection must never end
with a clean close the application did not ask for (net/ending.py). A dial that
is cancelled (its session ended) after the destination's kernel accepted the
connection closes the socket; a plain socket's close is a FIN, and the
destination sees a connection that opened and ended cleanly with nothing in it,
though the client behind the tunnel had sent bytes. Here every socket is made
abortive before it connects, and a winner cancelled before it is handed over is
closed (a reset), not left to the garbage collector.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, Final

import trio

from .ending import set_abortive

__all__ = ["ATTEMPT_DELAY", "Target", "open_tcp", "race_connect"]

#: Start connecting to the next address after this long without an answer from the
#: last one (RFC 8305 section 5; trio.open_tcp_stream's default).
ATTEMPT_DELAY: Final = 0.25

#: An address family and a socket address for ``connect``.
Target = tuple[socket.AddressFamily, Any]
_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """``trio.open_tcp_stream``, with abortive sockets: ``host``'s addresses raced, each
    family in turn.

    Raises:
        OSError: every address failed (the first address's error: tried longest).
    """
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    stream, errors = await race_connect([(info[0], info[4]) for info in _families_in_turn(infos)])
    if stream is None:
        raise errors[0]
    return stream


def _families_in_turn(infos: Sequence[_AddrInfo]) -> list[_AddrInfo]:
    """The first address, then the first of the other family, then the rest (RFC 6555
    section 5.4, as trio.open_tcp_stream orders them)."""
    for i, info in enumerate(infos[1:], 1):
        if info[0] != infos[0][0]:
            return [infos[0], info, *infos[1:i], *infos[i + 1:]]
    return list(infos)


async def race_connect(targets: Sequence[Target]) -> tuple[trio.SocketStream | None, list[OSError]]:
    """The first of ``targets`` to connect, trying the next after ``ATTEMPT_DELAY``
    or at once when one fails; None and every attempt's error if none did (in the
    order they failed)."""
    winner: list[trio.SocketStream] = []
    errors: list[OSError] = []
    try:
        async with trio.open_nursery() as nursery:
            for target in targets:
                failed = trio.Event()
                nursery.start_soon(_attempt, target, winner, errors, failed,
                                   nursery.cancel_scope)
                with trio.move_on_after(ATTEMPT_DELAY):
                    await failed.wait()
                if winner:
                    break
    except BaseException:
        for stream in winner:  # (cancelled once connected: reset, not leaked)
            stream.socket.close()
        raise
    return (winner[0] if winner else None), errors


async def _attempt(target: Target, winner: list[trio.SocketStream], errors: list[OSError],
                   failed: trio.Event, race: trio.CancelScope) -> None:
    family, address = target
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    set_abortive(sock)  # (a connect cancelled once the destination accepted it: a reset)
    try:
        await sock.connect(address)
    except OSError as exc:
        sock.close()
        errors.append(exc)
        failed.set()
        return
    except BaseException:
        sock.close()
        raise
    if winner:
        sock.close()
        return
    winner.append(trio.SocketStream(sock))
    race.cancel()
