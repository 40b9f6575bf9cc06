"""Accepting on a listening socket: what to retry, what to skip, what to stop on.

Shared by the agent's forwards and the relay's reverse listeners. Waiting for
readability first and accepting once per wake-up (the epoll registration is
level-triggered, so a backlog wakes it at once) costs less per short
connection than ``trio.SocketListener.accept`` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["accept_forever", "bind_tcp", "close_listener"]

log = logging.getLogger("wstunnel")

#: accept() errors that mean the system is out of something: wait and retry
#: (as trio.serve_listeners does).
_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_RETRY_INTERVAL: Final = 0.1
#: accept() errors about one connection only (it died in the backlog, a firewall
#: refused it, or a network error pending on it, which Linux reports here, see
#: accept(2)): skip it, as trio.SocketListener does.
_SKIP_ERRNOS: Final = frozenset(
    getattr(errno, name) for name in (
        "EPERM", "ECONNABORTED", "ECONNRESET", "ETIMEDOUT", "EPROTO", "ENETDOWN",
        "ENOPROTOOPT", "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH",
    ) if hasattr(errno, name)
)


async def accept_forever(listener: socket.socket,
                         on_accept: Callable[[socket.socket], None]) -> None:
    """Hand each accepted connection (non-blocking) to ``on_accept``, which runs in
    this task and must not block; until cancelled. Closes ``listener`` on the way
    out. Raises the OSError of a listener that broke for good."""
    short = False  # (a shortage is logged once, at its start, and once at its end)
    try:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue  # a spurious wake-up, or another process took it
            except OSError as exc:
                if exc.errno in _SKIP_ERRNOS:
                    continue
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                if not short:
                    log.error("%s", _shortage(exc.errno))
                short = True
                await trio.sleep(_RETRY_INTERVAL)
                continue
            if short:
                log.warning("accepting connections again")
                short = False
            sock.setblocking(False)
            on_accept(sock)
    finally:
        close_listener(listener)


def _shortage(number: int) -> str:
    """What a lack of ``number`` (an errno) means for new connections, and what helps."""
    advice = {errno.EMFILE: "raise the open-files limit (ulimit -n; systemd LimitNOFILE=)",
              errno.ENFILE: "the whole system is out of them (sysctl fs.file-max)"}
    return (f"accept returned {errno.errorcode[number]} ({os.strerror(number)}); retrying "
            f"in {_RETRY_INTERVAL} seconds until it passes, new connections waiting meanwhile"
            f"; {advice.get(number, 'free some memory')}")


def close_listener(listener: socket.socket) -> None:
    """Close a listening socket that a task may be waiting on (it then gets
    ``trio.ClosedResourceError``); its address can be bound again at once."""
    if listener.fileno() != -1:
        trio.lowlevel.notify_closing(listener)
        listener.close()


def bind_tcp(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on the IP literal ``host``.

    Raises:
        OSError: as bind(2) and listen(2) do.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
