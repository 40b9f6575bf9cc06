"""Unix stream sockets: a listener on a path that cleans up after itself, and connect.

Theory of operation
-------------------
A listening unix socket is a file, and nothing removes it when its program
stops: a later bind fails with EADDRINUSE on the leftover. ``bind_listener``
tells the two cases apart the way the kernel does: it connects to the path;
refused means nobody listens there (a stale socket of a dead run), which is
removed, while an accepted connection (or a full backlog) means a live
program, which is left alone. Only a socket file is ever removed; any other
file at the path is an error. The file is created ``0660`` less the umask
(``0640`` under the usual 022, ``0660`` under systemd's ``UMask=0007``):
owner and, if the umask allows, group may connect, nobody else. ``bind``
creates the file with that mode (under a umask widened just around it), so
there is no moment with looser permissions, and no chmod by path afterwards
that a symlink swapped in at the path could redirect. ``SocketFile.remove`` deletes
the file when the listener stops, unless it has been replaced meanwhile (it
checks the inode first).

Failure semantics differ from TCP, and no socket option changes them (Linux,
``unix_release_sock``): ``SO_LINGER {1, 0}`` is accepted and ignored, there
is no RST. Closing a unix stream socket gives its peer, after the bytes
already queued for it, ``ECONNRESET`` only when the closing side left unread
bytes in its own receive queue; otherwise a plain end of stream. A write to
a closed peer fails with ``EPIPE``. Data written is already in the peer's
receive queue, so a close never discards it (nothing is "unsent").
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import Final

__all__ = ["SOCKET_MODE", "SocketFile", "bind_listener", "connect_path"]

#: Permission bits of a listening socket file, before the umask is applied.
SOCKET_MODE: Final = 0o660
#: The kernel's backlog bound (trio asks for the same).
_BACKLOG: Final = socket.SOMAXCONN


class SocketFile:
    """The file of a unix socket we bound; ``remove`` deletes it if it is still ours."""

    __slots__ = ("path", "_identity")

    def __init__(self, path: str) -> None:
        self.path = path
        self._identity = _identity(path)

    def remove(self) -> None:
        """Delete the socket file unless another program has replaced it. Idempotent."""
        if self._identity is not None and _identity(self.path) == self._identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._identity = None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def bind_listener(path: str) -> tuple[socket.socket, SocketFile]:
    """A non-blocking unix stream socket listening on ``path``, and its file.

    A stale socket file (nothing listens on it) is replaced.

    Raises:
        OSError: EADDRINUSE (a program listens there), EEXIST (a file that is
            not a socket is there), or what ``bind`` raised (EACCES, ENOENT...).
    """
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind_with_mode(sock, path)
        socket_file = SocketFile(path)
        try:
            sock.listen(_BACKLOG)
        except BaseException:
            socket_file.remove()
            raise
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, socket_file


def _bind_with_mode(sock: socket.socket, path: str) -> None:
    """Bind ``sock`` to ``path``, creating the file ``SOCKET_MODE`` less the umask.

    bind applies the umask to 0777, so the bits ``SOCKET_MODE`` lacks are added
    to the umask just around it. Not a chmod after bind: that goes by path and
    follows a symlink, and in a directory others may write to, the file can be
    swapped for a link to one of ours in between (a socket has no fchmod). The
    umask is process-wide: for these few microseconds another thread's new
    file gets no more bits than a socket's; this program's threads (DNS, token
    checks) create no files.
    """
    umask = os.umask(0o777 & ~SOCKET_MODE)  # (the umask is read by setting it)
    try:
        os.umask(umask | (0o777 & ~SOCKET_MODE))
        sock.bind(path)
    finally:
        os.umask(umask)


def _clear_stale(path: str) -> None:
    """Remove the socket file at ``path`` when nobody listens on it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(errno.EEXIST, "the path exists and is not a socket", path)
    try:
        probe = connect_path(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: its program is gone
        return
    except BlockingIOError:
        pass  # a full backlog: someone listens
    else:
        probe.close()
    raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path)


def connect_path(path: str) -> socket.socket:
    """A non-blocking unix stream socket connected to ``path``.

    A unix connect completes at once or fails: it does not wait in the kernel.

    Raises:
        OSError: ECONNREFUSED (nobody listens), ENOENT, EACCES,
            BlockingIOError (EAGAIN: the listener's backlog is full)...
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock
