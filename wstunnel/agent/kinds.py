"""Forward kinds: how a local thing that wants a channel becomes an OPEN.

Theory of operation
-------------------
Two small interfaces meet here:

* ``ChannelOpener`` is what the agent offers every kind (``Agent``
  implements it): given a destination and a local connection, open a channel
  to that destination on the current session (the OPEN) and carry the
  connection over it. ``carry_now`` does it in the caller's task, with no task
  of its own, when a session with a socket pump is up; ``carry`` waits for a
  session and carries in the caller's task (the pump, or splice).
* ``ForwardKind`` is one kind of forward: for each local connection accepted
  for one of its forwards, it decides where the channel goes and whether that
  can happen now or needs a task (returned as the rest to run).

``LocalTcpForward`` (``-L`` / ``forwards:``): every connection goes to the
forward's fixed target, at once when it can: ``host:port`` (kind TCP), or a
unix socket path on the relay's host (kind UNIX: the path as the host and
``mux.PATH_KIND_PORT``, docs/PROTOCOL.md section 4). The local connection
itself may be TCP or a unix socket (a ``-L /path:...`` listener); both are
carried the same way. ``DynamicForward`` (``-D``)
(dynamic.py) must read from its client first (a SOCKS or HTTP proxy learns the
destination that way, socks.py) and answer it only once the relay has
connected: it returns a task that reads, ``open_channel``, waits for the
relay's answer (``ChannelStream.wait_opened``), replies, then
``carry_channel``. The listeners (``forwards.ForwardSet``) and the carrying
stay as they are.

A task-free open matters: a task per connection costs a churn of short
connections several scheduler rounds each (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

import trio

from .. import mux

if TYPE_CHECKING:
    from ..config import Forward
    from ..net.channel_stream import ChannelStream

__all__ = ["ChannelOpener", "ForwardKind", "LocalTcpForward", "Rest", "target_of"]

#: What is left to do for a connection, to run in a task of its own.
Rest = Callable[[], Awaitable[None]]


class ChannelOpener(Protocol):
    """Opens a channel for a local connection and carries the connection over it."""

    def carry_now(self, host: str, port: int, sock: socket.socket, *,
                  kind: int = mux.ChannelKind.TCP, forward: str | None = None) -> bool:
        """Open a channel of ``kind`` to host:port for ``forward`` (its label) and hand
        ``sock`` to the session's socket pump now, in the caller's task; its first
        bytes, if already here, leave with the OPEN. True: done, the pump owns
        ``sock``. False: nothing changed (no usable session, no pump, or the open
        failed); ``carry`` it instead."""

    async def carry(self, host: str, port: int, stream: trio.abc.HalfCloseableStream, *,
                    kind: int = mux.ChannelKind.TCP, forward: str | None = None) -> None:
        """Wait for a session (up to ``connect_wait_timeout``), open a channel of
        ``kind`` to host:port and carry ``stream`` over it until both ends are done.
        Owns ``stream``: it is closed (with RST unless it ended cleanly) on return."""

    async def open_channel(self, host: str, port: int, *, kind: int = mux.ChannelKind.TCP,
                           forward: str | None = None) -> ChannelStream | None:
        """Wait for a session (up to ``connect_wait_timeout``) and open a channel of
        ``kind`` to host:port; None (logged): no session, or no channel could be opened."""

    async def carry_channel(self, channel: ChannelStream,
                            stream: trio.abc.HalfCloseableStream) -> None:
        """``carry`` over a channel from ``open_channel``; owns ``stream``."""


class ForwardKind(Protocol):
    """One kind of forward: turns each local connection it accepted into an OPEN."""

    def connection(self, forward: Forward, sock: socket.socket,
                   opener: ChannelOpener) -> Rest | None:
        """``sock`` was accepted for ``forward`` (non-blocking, tuned, abortive until it
        ends cleanly); runs in the accepting task, so must not block. None: dealt
        with. Otherwise the rest, to run in a task; it then owns ``sock``."""


class LocalTcpForward:
    """``-L LISTEN:HOST:PORT`` or ``-L LISTEN:unix:/path``: every connection goes to
    the forward's target."""

    def connection(self, forward: Forward, sock: socket.socket,
                   opener: ChannelOpener) -> Rest | None:
        host, port, kind = target_of(forward)
        label = forward.label
        if opener.carry_now(host, port, sock, kind=kind, forward=label):
            return None
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        return partial(opener.carry, host, port, stream, kind=kind, forward=label)


def target_of(forward: Forward) -> tuple[str, int, mux.ChannelKind]:
    """The OPEN's (host, port, kind) for ``forward``'s fixed target."""
    if forward.target_path is not None:
        return forward.target_path, mux.PATH_KIND_PORT, mux.ChannelKind.UNIX
    return forward.target_host, forward.target_port, mux.ChannelKind.TCP
