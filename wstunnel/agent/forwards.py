"""The agent's set of local listeners, changeable while connections run.

Theory of operation
-------------------
Each forward is a slot: its listeners, a cancel scope around their accept
loop, and the forward it currently serves. Each accepted connection goes to
the forward's kind (kinds.py), which opens its channel at once or returns the
rest to run as a task; those tasks run in the caller's ``connections``
nursery, *outside* the slot's scope, so stopping a listener never touches
connections it already accepted.

``apply(new_forwards)`` is all or nothing: it first binds every new listen
address; if any bind fails, the ones just bound are closed, a ``ListenError``
naming that forward, why and what to do is raised, and nothing has changed
(a reload that cannot bind keeps every running forward and the session).
Only then are removed slots cancelled and new ones started. A forward that
keeps its listen address but changes its target keeps its socket (no window
where connections are refused); new
connections go to the new target, open ones keep theirs. Port 0 listeners
are matched by the whole forward (and which repeat of it it is), since
their address is not known up front. A unix socket listener is keyed by its
path; its file is created, replacing a stale one, by net/unix_socket.py and
removed when the listener stops (a reload that drops it, shutdown, or a
failed ``apply`` that had bound it). A UDP forward's slot holds UDP sockets
and serves their datagrams as flows (udp.py) instead of accepting; it is keyed
apart from a TCP listener on the same address.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Sequence
from functools import partial
from typing import Any, Final

import trio

from ..config import Forward
from ..config.textforms import DYNAMIC, UDP
from ..errors import TunnelError
from ..net.accepting import accept_forever
from ..net.ending import set_abortive
from ..net.sockopts import tune_plain_socket
from ..net.unix_socket import SocketFile, bind_listener
from .dynamic import DynamicForward
from .kinds import ChannelOpener, ForwardKind, LocalTcpForward
from .udp import bind_udp, serve_udp_forward

__all__ = ["ForwardSet", "ListenError"]

log = logging.getLogger("wstunnel.agent")

Bound = list[tuple[str, int]]


#: bind() errors: what happened, what to do, and whether the configuration itself
#: is wrong on this machine (exit code 2) rather than the machine's state (1).
_BIND_ERRORS: Final = {
    errno.EADDRINUSE: ("address already in use", "stop the program listening there or pick "
                       "another port (ss -ltnp 'sport = :{port}' shows which)", False),
    errno.EACCES: ("permission denied", "ports below 1024 need root or CAP_NET_BIND_SERVICE "
                   "(systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE); or pick a port above "
                   "1023", False),
    errno.EADDRNOTAVAIL: ("no such address on this machine", "use one of its addresses, e.g. "
                          "127.0.0.1, or 0.0.0.0 for all", True),
}
#: The same for a unix socket path ({path}: the path).
_PATH_BIND_ERRORS: Final = {
    errno.EADDRINUSE: ("a running program listens on it", "stop that program or pick another "
                       "path (ss -xlp shows which program listens on {path})", False),
    errno.EEXIST: ("the path exists and is not a socket, so it is not removed", "move that "
                   "file away or pick another path", False),
    errno.EACCES: ("permission denied", "pick a directory this user may write to, e.g. "
                   "$XDG_RUNTIME_DIR, or give it one (systemd: RuntimeDirectory=)", False),
    errno.ENOENT: ("its directory does not exist", "create the directory (systemd: "
                   "RuntimeDirectory=) or pick another path", True),
    errno.ENOTDIR: ("a part of the path is not a directory", "pick another path", True),
}


class ListenError(TunnelError):
    """A forward's listen address cannot be bound.

    ``str()`` names the forward, why and what to do, e.g. ``forwards[1]: cannot
    listen on 127.0.0.1:5432 (forward to db:5432): address already in use — …``.
    ``config_problem``: no run of this configuration can bind it on this machine.
    """

    def __init__(self, forward: Forward, position: int, exc: OSError) -> None:
        why, advice, self.config_problem = _bind_error(forward, exc)
        self.key_path = f"forwards[{position}]"
        advice = advice.format(port=forward.listen_port, path=forward.listen_path)
        self.detail = (f"cannot listen on {forward.listen_text} (forward to {forward.goes_to}): "
                       f"{why} \N{EM DASH} {advice}")
        super().__init__(f"{self.key_path}: {self.detail}")


def _bind_error(forward: Forward, exc: OSError) -> tuple[str, str, bool]:
    if forward.listen_path is not None and exc.errno in _PATH_BIND_ERRORS:
        return _PATH_BIND_ERRORS[exc.errno]
    if isinstance(exc, socket.gaierror):
        return (f"cannot resolve {forward.listen_host} ({exc.strerror})",
                "use an address of this machine, e.g. 127.0.0.1", True)
    if exc.errno in _BIND_ERRORS:
        return _BIND_ERRORS[exc.errno]
    return (exc.strerror or str(exc)).lower(), "check the forward's listen address", False


class _Slot:
    """One forward's listeners; ``socket_file``: the file of a unix socket listener."""

    def __init__(self, forward: Forward, listeners: list[socket.socket],
                 socket_file: SocketFile | None = None) -> None:
        self.forward = forward
        self.listeners = listeners
        self.socket_file = socket_file
        self.bound: Bound = ([(socket_file.path, 0)] if socket_file is not None
                             else [ls.getsockname()[:2] for ls in listeners])
        self.scope = trio.CancelScope()

    def close(self) -> None:
        """Close the listeners and remove the socket file (a unix listener)."""
        for listener in self.listeners:
            listener.close()
        if self.socket_file is not None:
            self.socket_file.remove()


def _keys(forwards: Sequence[Forward]) -> list[object]:
    """Slot keys: the listen path or address, or for port 0 the forward and its
    repeat count."""
    seen: dict[Forward, int] = {}
    keys: list[object] = []
    for forward in forwards:
        if forward.listen_path is not None:
            keys.append(("unix", forward.listen_path))
        elif forward.listen_port != 0:
            keys.append((UDP, forward.listen) if forward.protocol == UDP else forward.listen)
        else:
            seen[forward] = seen.get(forward, 0) + 1
            keys.append((forward, seen[forward]))
    return keys


class ForwardSet:
    """Listeners for the agent's forwards; see the module docstring.

    Args:
        opener: opens and carries the channels (the agent).
        connections: the nursery where connections that need a task run.
        kind: what each accepted connection becomes; None: each forward's own
            kind (``-L`` or ``-D``, ``kind_of``).
    """

    def __init__(self, opener: ChannelOpener, connections: trio.Nursery,
                 kind: ForwardKind | None = None) -> None:
        self._opener = opener
        self._kind = kind
        self._connections = connections
        self._slots: dict[object, _Slot] = {}
        self._accepting: trio.Nursery | None = None

    @property
    def forwards(self) -> list[Forward]:
        return [slot.forward for slot in self._slots.values()]

    def bound(self) -> list[Bound]:
        """Bound (host, port) pairs per forward, in order."""
        return [slot.bound for slot in self._slots.values()]

    async def apply(self, forwards: Sequence[Forward]) -> list[Bound]:
        """Make the listeners match ``forwards``; return :meth:`bound` in that order.

        Raises:
            ListenError: a new address could not be bound; nothing was changed.
        """
        wanted, fresh = await self._bind_missing(forwards)
        await self._commit(wanted, fresh)
        return self.bound()

    async def serve(self, forwards: Sequence[Forward], *, task_status: Any) -> None:
        """Bind and serve ``forwards`` until :meth:`close` or cancellation.

        Raises:
            ListenError: a forward could not be bound (raised as is, before
                anything started, so that the caller can report it plainly).
        """
        wanted, fresh = await self._bind_missing(forwards)
        async with trio.open_nursery() as accepting:
            self._accepting = accepting
            await self._commit(wanted, fresh)
            task_status.started(self.bound())
            await trio.sleep_forever()

    def close(self) -> None:
        """Stop accepting on every listener (connections continue)."""
        if self._accepting is not None:
            self._accepting.cancel_scope.cancel()

    async def _bind_missing(self, forwards: Sequence[Forward]
                            ) -> tuple[dict[object, Forward], dict[object, _Slot]]:
        """The wanted slots by key, and new slots bound for the keys not served yet."""
        wanted = dict(zip(_keys(forwards), forwards, strict=True))
        new = {k: (i, f) for i, (k, f) in enumerate(wanted.items()) if k not in self._slots}
        return wanted, await self._bind_new(new)

    async def _commit(self, wanted: dict[object, Forward], fresh: dict[object, _Slot]) -> None:
        for key in [k for k in self._slots if k not in wanted]:
            slot = self._slots.pop(key)
            slot.scope.cancel()
            log.info("stopped listening on %s (its open connections continue)", _addrs(slot.bound))
        for key, forward in wanted.items():
            slot = self._slots.get(key) or fresh[key]
            if slot.forward != forward:
                log.info("%s now forwards to %s (open connections keep %s)",
                         _addrs(slot.bound), forward.goes_to, slot.forward.goes_to)
                slot.forward = forward
        for slot in fresh.values():
            await self._start(slot)
        self._slots = {key: self._slots.get(key) or fresh[key] for key in wanted}

    async def _bind_new(self, forwards: dict[object, tuple[int, Forward]]
                        ) -> dict[object, _Slot]:
        """Bind each (position, forward); on a failure close those bound and raise."""
        fresh: dict[object, _Slot] = {}
        try:
            for key, (position, forward) in forwards.items():
                try:
                    fresh[key] = await _bind(forward)
                except OSError as exc:
                    raise ListenError(forward, position, exc) from exc
        except BaseException:
            for slot in fresh.values():
                slot.close()
            raise
        return fresh

    async def _start(self, slot: _Slot) -> None:
        assert self._accepting is not None, "serve() starts the listeners"
        await self._accepting.start(self._serve_slot, slot)
        forward = slot.forward
        named = f" ({forward.name})" if forward.name is not None else ""
        log.info("forwarding %s -> %s%s", _addrs(slot.bound), forward.goes_to, named)

    async def _serve_slot(self, slot: _Slot, *, task_status: Any) -> None:
        with slot.scope:
            async with trio.open_nursery() as nursery:
                for listener in slot.listeners:
                    serve = (self._serve_datagrams if slot.forward.protocol == UDP
                             else self._accept_loop)
                    nursery.start_soon(serve, slot, listener)
                task_status.started(slot.listeners)

    async def _serve_datagrams(self, slot: _Slot, sock: socket.socket) -> None:
        """A UDP forward's socket: each client address a flow (udp.py)."""
        try:
            await serve_udp_forward(sock, lambda: slot.forward, self._opener)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _accept_loop(self, slot: _Slot, listener: socket.socket) -> None:
        """trio.serve_listeners for one listener, except that the forward's kind may
        take a connection over right here (a task per connection costs a churn of
        short connections several scheduler rounds each): net/accepting.py accepts
        on the standard-library socket, once per wake-up (docs/PERFORMANCE.md)."""
        try:
            await accept_forever(listener, partial(self._accepted, slot))
        finally:
            if slot.socket_file is not None:  # (its one listener)
                slot.socket_file.remove()

    def _accepted(self, slot: _Slot, sock: socket.socket) -> None:
        if slot.socket_file is None:  # (TCP options and SO_LINGER: net/unix_socket.py)
            tune_plain_socket(sock, notsent_lowat=True)
            set_abortive(sock)  # (a clean end clears it: net/ending.py)
        kind = self._kind or kind_of(slot.forward)
        rest = kind.connection(slot.forward, sock, self._opener)
        if rest is not None:
            self._connections.start_soon(rest)


_LOCAL: Final = LocalTcpForward()
_DYNAMIC: Final = DynamicForward()


def kind_of(forward: Forward) -> ForwardKind:
    """The kind that serves ``forward``'s connections (``-L`` or ``-D``)."""
    return _DYNAMIC if forward.kind == DYNAMIC else _LOCAL


async def _bind(forward: Forward) -> _Slot:
    """A slot with ``forward``'s listeners bound (not accepting yet).

    Raises:
        OSError: from bind (or resolving the listen address).
    """
    if forward.listen_path is not None:
        sock, socket_file = bind_listener(forward.listen_path)
        return _Slot(forward, [sock], socket_file)
    if forward.protocol == UDP:
        return _Slot(forward, await bind_udp(forward.listen_host, forward.listen_port))
    listeners = await trio.open_tcp_listeners(forward.listen_port, host=forward.listen_host)
    return _Slot(forward, [_stdlib_socket(ls) for ls in listeners])


def _stdlib_socket(listener: trio.SocketListener) -> socket.socket:
    """The listening socket trio bound (its address families, options and backlog),
    as a non-blocking standard-library socket for ``_accept_loop``."""
    sock = socket.socket(fileno=listener.socket.detach())
    sock.setblocking(False)
    return sock


def _addrs(bound: Bound) -> str:
    """``host:port, ...`` (``[v6]:port``); a unix socket listener's path alone (bound
    as (path, 0))."""
    return ", ".join(h if h.startswith("/") else f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                     for h, p in bound)
