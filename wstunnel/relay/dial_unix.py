"""The relay's connect to a unix socket path (channel kind UNIX).

An OPEN of kind UNIX carries the path as its host (and ``mux.PATH_KIND_PORT``
as its port, ignored: docs/PROTOCOL.md section 4). The path is checked
against the agent's ``unix:`` allow rules (security/policy.py), then
connected without a task: a unix connect completes at once or fails, it never
waits in the kernel, except when the server's listen backlog is full
(``EAGAIN``), where a TCP client would wait for the SYN to be retried; that
one connect is retried in a task, with a short backoff, up to the timeout.
"""

from __future__ import annotations

import errno
import socket
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

from .. import mux
from ..net.unix_socket import connect_path
from .dial import Connecting, DialError

if TYPE_CHECKING:
    from ..security.policy import Policy

__all__ = ["UnixConnector"]

#: First and longest pause between connects to a listener whose backlog is full.
_BACKLOG_RETRY_INTERVAL: Final = 0.005
_BACKLOG_RETRY_MAX_INTERVAL: Final = 0.1

#: connect() errors: the OPEN_FAILED reason and what the agent is told ({path}).
_CONNECT_ERRORS: Final = {
    errno.ECONNREFUSED: (mux.OpenFailure.REFUSED, "nothing listens on unix:{path} (connection "
                         "refused: its server is not running, or left a stale socket file)"),
    errno.ENOENT: (mux.OpenFailure.UNREACHABLE, "unix:{path} does not exist on the relay host"),
    errno.ENOTDIR: (mux.OpenFailure.UNREACHABLE, "unix:{path}: a part of the path is not a "
                    "directory"),
    errno.EACCES: (mux.OpenFailure.FORBIDDEN, "the relay's user may not connect to "
                   "unix:{path} (permission denied: it needs write permission on the socket "
                   "and search permission on its directories)"),
    errno.EPERM: (mux.OpenFailure.FORBIDDEN, "the relay's user may not connect to unix:{path} "
                  "(operation not permitted)"),
    errno.EPROTOTYPE: (mux.OpenFailure.UNREACHABLE, "unix:{path} is not a stream socket"),
}


class UnixConnector:
    """A unix socket destination: checked against the ``unix:`` allow rules, then
    connected at once."""

    def connect(self, host: str, port: int, policy: Policy, *,
                timeout: float) -> socket.socket | Connecting:
        """See ``dial.Connector``; ``host`` is the path, ``port`` is ignored.

        Raises:
            DialError: forbidden by policy, or the connect failed.
        """
        refusal = policy.path_refusal(host)
        if refusal is not None:
            raise DialError(mux.OpenFailure.FORBIDDEN,
                            f"unix:{host} is not allowed by the relay's policy: {refusal}")
        try:
            return connect_path(host)
        except BlockingIOError:
            return partial(_connect_when_room, host, timeout)
        except OSError as exc:
            raise _dial_error(host, exc) from exc


async def _connect_when_room(path: str, timeout: float) -> socket.socket:
    """Connect to a listener whose backlog was full, retrying until ``timeout``."""
    interval = _BACKLOG_RETRY_INTERVAL
    with trio.move_on_after(timeout):
        while True:
            await trio.sleep(interval)
            try:
                return connect_path(path)
            except BlockingIOError:
                interval = min(interval * 2, _BACKLOG_RETRY_MAX_INTERVAL)
            except OSError as exc:
                raise _dial_error(path, exc) from exc
    raise DialError(mux.OpenFailure.TIMEOUT, f"unix:{path} accepted no connection within "
                    f"{timeout:g} s (its listen backlog stayed full)")


def _dial_error(path: str, exc: OSError) -> DialError:
    reason, text = _CONNECT_ERRORS.get(
        exc.errno or 0, (mux.OpenFailure.UNREACHABLE, "cannot connect to unix:{path}: "
                         + (exc.strerror or str(exc)).lower()))
    return DialError(reason, text.format(path=path))
