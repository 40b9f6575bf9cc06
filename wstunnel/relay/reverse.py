"""The relay's side of reverse forwards (``-R``): listeners that agents ask for.

Theory of operation
-------------------
An agent asks with an OPEN of kind TCP_LISTEN (host, port) or UNIX_LISTEN
(path). The relay checks the agent's ``listen_allow``, binds, and answers
OPEN_OK (listening) or OPEN_FAILED (why). That channel then carries nothing:
it is the listener's lease. The listener lives exactly as long as the
channel, so it closes the moment the agent resets the channel (the forward
was removed) or the session is known dead (ping timeout, close, protocol
error); nothing is left bound for a session that is gone.

Each connection accepted there becomes a channel the relay opens towards the
agent: an OPEN of kind TCP (UNIX) whose host and port (path) are the
listener's, as the agent asked for it, so the agent knows which forward it is
for. The agent alone decides where it goes (agent/reverse.py).
A UDP_LISTEN lease (``-R udp:``) binds a UDP socket instead, checked against
``udp:`` listen_allow rules, and each client address sending to it is a flow
with a channel of kind UDP (reverse_udp.py).

One address, one holder, relay-wide (``ReverseListeners``). An agent asking
for an address another agent holds is refused with REFUSED, and only the
relay's log names the holder. The same agent asking again (it reconnected
before the relay noticed that its old session died) takes the address over
at once: the old lease is reset, its socket closed and the address bound
again, with no wait for a ping timeout. With ``no_auth`` every agent is the
same anonymous agent, so any of them may take over.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import trio

from .. import mux
from ..addresses import bracketed, join_host_port
from ..errors import ChannelRefused, ChannelReset, SessionClosed
from ..net.accepting import accept_forever, bind_tcp, close_listener
from ..net.channel_stream import ChannelStream, until_ended
from ..net.ending import set_abortive
from ..net.sockopts import tune_plain_socket
from ..net.splice import splice_to_end
from ..net.transport import TunnelTransport
from ..net.unix_socket import SocketFile, bind_listener
from ..security.listen_policy import ListenPolicy
from .reverse_udp import bind_udp, serve_datagrams

__all__ = ["LISTEN_KINDS", "ReverseListeners"]

log = logging.getLogger("wstunnel.relay")

LISTEN_KINDS: Final = frozenset({mux.ChannelKind.TCP_LISTEN, mux.ChannelKind.UNIX_LISTEN,
                                 mux.ChannelKind.UDP_LISTEN})

Rest = Callable[[], Awaitable[None]]

#: bind() errors: what the agent is told.
_BIND_FAILURES: Final = {
    errno.EADDRINUSE: (mux.OpenFailure.REFUSED, "address already in use on the relay host"),
    errno.EACCES: (mux.OpenFailure.FORBIDDEN, "permission denied on the relay host: ports "
                   "below 1024 need root or CAP_NET_BIND_SERVICE there; pick a port above 1023"),
    errno.EADDRNOTAVAIL: (mux.OpenFailure.UNREACHABLE, "no such address on the relay host"),
}
#: The same for a unix socket path.
_PATH_BIND_FAILURES: Final = {
    **_BIND_FAILURES,
    errno.EADDRINUSE: (mux.OpenFailure.REFUSED, "a program on the relay host listens on that "
                       "path"),
    errno.EACCES: (mux.OpenFailure.FORBIDDEN, "permission denied on the relay host: the relay's "
                   "user may not create a socket file in that directory; pick one it may "
                   "write to"),
    errno.EEXIST: (mux.OpenFailure.REFUSED, "a file that is not a socket is at that path"),
    errno.ENOENT: (mux.OpenFailure.UNREACHABLE, "no such directory on the relay host"),
    errno.ENOTDIR: (mux.OpenFailure.UNREACHABLE, "a part of the path is not a directory on "
                    "the relay host"),
}


@dataclass(eq=False)
class _Lease:
    """One listener and the channel that keeps it."""

    where: str  # "127.0.0.1:2222" or "unix:/run/app.sock", as logs say it
    agent: str
    transport: TunnelTransport
    channel: ChannelStream
    listener: socket.socket
    socket_file: SocketFile | None  # a unix listener's file, removed when it ends
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ended: str = ""
    udp: bool = False  # a UDP socket (UDP_LISTEN): flows, not connections

    @property
    def connect_kind(self) -> mux.ChannelKind:
        if self.udp:
            return mux.ChannelKind.UDP
        return mux.ChannelKind.UNIX if self.socket_file is not None else mux.ChannelKind.TCP


class ReverseListeners:
    """Every reverse listener of this relay, by address."""

    def __init__(self) -> None:
        self._leases: dict[str, _Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def status(self) -> list[dict[str, str]]:
        """One row per listener, for ``wstunnel status``."""
        return [{"forward": f"agent {lease.agent}", "listen": lease.where,
                 "target": f"session {lease.transport.name}", "state": "listening"}
                for lease in self._leases.values()]

    def request(self, transport: TunnelTransport, channel: ChannelStream, agent: str,
                policy: ListenPolicy | None) -> Rest | None:
        """An admitted OPEN of a listen kind: answered here; the rest serves the
        listener in a task of the session (so it ends with the session)."""
        path = channel.host if channel.kind == mux.ChannelKind.UNIX_LISTEN else None
        udp = channel.kind == mux.ChannelKind.UDP_LISTEN
        where = (f"unix:{path}" if path is not None else
                 f"udp:{bracketed(channel.host)}:{channel.port}" if udp
                 else join_host_port(channel.host, channel.port))
        refusal = (f"agent {agent} is no longer configured on this relay" if policy is None
                   else policy.refusal(channel.host, channel.port, path, udp=udp))
        if refusal is not None:
            log.warning("%s: refused to listen for agent %s: %s", transport.name, agent, refusal)
            transport.refuse(channel, mux.OpenFailure.FORBIDDEN, refusal)
            return None
        held = self._leases.get(where)
        if held is not None and held.agent != agent:
            log.warning("%s: agent %s asked to listen on %s, which agent %s holds (%s); "
                        "refused", transport.name, agent, where, held.agent, held.transport.name)
            transport.refuse(channel, mux.OpenFailure.REFUSED,
                             f"{where} is in use by another agent of this relay")
            return None
        if held is not None:
            log.info("%s: agent %s takes %s over from its earlier session %s",
                     transport.name, agent, where, held.transport.name)
            self._release(held, "taken over by a newer session of the same agent")
        try:
            listener, socket_file = _bind(channel.host, channel.port, path, udp)
        except OSError as exc:
            failures = _BIND_FAILURES if path is None else _PATH_BIND_FAILURES
            reason, text = failures.get(exc.errno or 0, (
                mux.OpenFailure.INTERNAL_ERROR, (exc.strerror or str(exc)).lower()))
            log.warning("%s: cannot listen on %s for agent %s: %s", transport.name, where,
                        agent, text)
            transport.refuse(channel, reason, f"cannot listen on {where}: {text}")
            return None
        if not transport.accept(channel):  # (the session ended or the agent gave up)
            close_listener(listener)
            if socket_file is not None:
                socket_file.remove()
            return None
        lease = _Lease(where, agent, transport, channel, listener, socket_file, udp=udp)
        self._leases[where] = lease
        log.info("%s: listening on %s for agent %s", transport.name, where, agent)
        return partial(self._serve, lease)

    async def _serve(self, lease: _Lease) -> None:
        """Accept until the lease ends; connections carried without a socket pump
        (splice) may outlive the listener, as the pumped ones do."""
        async with trio.open_nursery() as spliced:
            spliced.start_soon(_end_with_channel, lease)
            try:
                with lease.scope:
                    if lease.udp:
                        await serve_datagrams(lease.transport, lease.listener, lease.channel,
                                              lease.where)
                    await accept_forever(lease.listener,
                                         partial(self._accepted, lease, spliced))
            except trio.ClosedResourceError:
                pass  # taken over: _release said why
            except OSError as exc:
                lease.ended = f"the listener failed: {exc.strerror or exc}"
            finally:
                self._drop(lease)

    def release_all(self, why: str) -> None:
        """Stop every listener now (the relay is shutting down: it takes no new
        connections there while the open ones drain)."""
        for lease in list(self._leases.values()):
            self._release(lease, why)

    def _accepted(self, lease: _Lease, spliced: trio.Nursery, sock: socket.socket) -> None:
        """One connection on a reverse listener: a channel towards the agent, carried
        by the session's socket pump (no task), else spliced in ``spliced``."""
        transport = lease.transport
        if lease.socket_file is None:  # (no TCP options, nor RST, on a unix socket)
            tune_plain_socket(sock, notsent_lowat=True)
            set_abortive(sock)  # (a clean end clears it: net/ending.py)
        try:
            channel = transport.open_channel(lease.channel.host, lease.channel.port,
                                             kind=lease.connect_kind, forward=f"-R {lease.where}")
        except (SessionClosed, ChannelRefused) as exc:
            sock.close()  # (abortive: the client sees a reset)
            log.warning("%s: reset a connection to %s: cannot open a channel to agent %s: %s",
                        transport.name, lease.where, lease.agent, exc)
            if transport.goaway_received:  # the agent is leaving: stop taking connections
                self._release(lease, "the agent is going away")
            return
        if transport.observer is not None:
            transport.observer.channel_carried(channel, sock)
        if not transport.attach_socket(sock, channel, read_now=True):
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            spliced.start_soon(splice_to_end, stream, channel)

    def _release(self, lease: _Lease, why: str) -> None:
        """End a lease now, from outside its task: the address is free on return."""
        lease.ended = why
        lease.scope.cancel()
        close_listener(lease.listener)
        self._drop(lease)

    def _drop(self, lease: _Lease) -> None:
        if self._leases.get(lease.where) is not lease:
            return
        if lease.channel.error is None:  # (the lease ended here: tell the agent)
            lease.channel.abort(lease.ended or "the relay stopped listening",
                                mux.ResetCode.CANCELLED)
        del self._leases[lease.where]
        close_listener(lease.listener)
        if lease.socket_file is not None:
            lease.socket_file.remove()
        why = lease.ended or _channel_end(lease.channel, lease.transport)
        log.info("%s: stopped listening on %s for agent %s: %s", lease.transport.name,
                 lease.where, lease.agent, why)


async def _end_with_channel(lease: _Lease) -> None:
    await until_ended(lease.channel)
    lease.scope.cancel()


def _channel_end(channel: ChannelStream, transport: TunnelTransport) -> str:
    error = channel.error
    if isinstance(error, ChannelReset):
        return "the agent released it"
    if error is not None:
        return str(error)
    return f"the session ended: {transport.end_reason or 'closed'}"


def _bind(host: str, port: int, path: str | None,
          udp: bool = False) -> tuple[socket.socket, SocketFile | None]:
    if udp:
        return bind_udp(host, port), None
    if path is None:
        return bind_tcp(host, port), None
    return bind_listener(path)
