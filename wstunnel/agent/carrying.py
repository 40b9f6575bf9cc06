"""Local connections carried as channels: the agent's side of every forward kind.

Theory of operation: ``Carrier`` is the ``ChannelOpener`` of every forward
kind (kinds.py). A local connection opens a channel on the current session
(session_slot.py; its first bytes travel right behind the OPEN) and is handed
to the session's socket pump (net/pump.py; no task per connection from then
on): at once in the accepting task when a session is up (``carry_now``), else
from a task that waits up to ``connect_wait_timeout`` for one (``carry``), and
spliced until both sides finish where there is no pump. When the session
drops, its channels break and their local sockets are closed, never left
hanging. A channel its relay refused because it was going away (the OPEN
crossed the GOAWAY) is opened again on the next session, its socket moved
over from the pump (``_reopener``) or spliced again, with the bytes it had
sent (reopen.py). Apart from agent.py, which keeps the session up.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial

import trio

from .. import mux
from ..config import AgentConfig
from ..errors import ChannelRefused, SessionClosed
from ..net.channel_stream import ChannelStream
from ..net.ending import abort_stream
from ..net.splice import close_spliced, splice
from ..net.transport import TunnelTransport
from ..service.metrics import TunnelStats
from .reopen import reopen
from .session_slot import SessionSlot

__all__ = ["Carrier"]

log = logging.getLogger("wstunnel.agent")


class Carrier:
    """Opens channels for local connections and carries them; counts them."""

    def __init__(self, config: Callable[[], AgentConfig], sessions: SessionSlot,
                 stats: TunnelStats, stopping: Callable[[], bool]) -> None:
        self._config = config  # (the agent's, as reloads change it)
        self.sessions = sessions
        self.stats = stats
        self._stopping = stopping
        self._channels = 0
        self._idle = trio.Event()
        self._idle.set()
        #: Where a pumped connection refused with GOING_AWAY is opened again (``_reopener``);
        #: None outside ``Agent.maintain_session`` (``--stdio`` retries on its own).
        self.reopening: trio.Nursery | None = None

    async def wait_idle(self) -> None:
        """Until no local connection is carried."""
        await self._idle.wait()

    @property
    def open_connections(self) -> int:
        """Local connections being carried (or waiting for a session) now."""
        return self._channels

    # -- ChannelOpener (kinds.py): what every forward kind opens channels with --------

    def carry_now(self, host: str, port: int, sock: socket.socket, *,
                  kind: int = mux.ChannelKind.TCP, forward: str | None = None) -> bool:
        """Open a channel and hand ``sock`` to the session's socket pump at once, with
        no task, when the session is up and has a pump; True when done. Its first
        bytes, if already here, go out in the same write as the OPEN.

        False (nothing changed): no usable session, no pump, or the open failed;
        ``carry`` then deals with it (waits for a session, splices, logs).
        """
        session = self.sessions.usable_now()
        if session is None:
            return False  # (e.g. resuming: ``carry`` waits up to connect_wait_timeout)
        try:
            channel = session.open_channel(host, port, kind=kind, forward=forward)
        except (SessionClosed, ChannelRefused):
            return False
        self._connection_opened()  # (the accept loop has set TCP_NODELAY)
        finished = partial(self._channel_finished, channel.destination, channel)
        self.stats.channel_carried(channel, sock)  # (the access log's source address)
        session.attach_socket(sock, channel, finished, read_now=True,
                              reopen=self._reopener(channel))
        return True

    async def carry(self, host: str, port: int, stream: trio.abc.HalfCloseableStream, *,
                    kind: int = mux.ChannelKind.TCP, forward: str | None = None) -> None:
        """One local connection, carried as one channel; closes ``stream`` unless the
        session's socket pump took it over."""
        self._connection_opened()
        handed_over = False
        try:  # (the accept loop has tuned the socket)
            handed_over = await self._carry(host, port, stream, kind, forward)
        finally:
            if not handed_over:  # (closed by now, unless cancelled: that is a failure)
                await abort_stream(stream)
                self._connection_closed()

    def tracked(self) -> Callable[[], None]:
        """Count a connection carried for a reverse forward; returns its "finished"."""
        self._connection_opened()
        return self._connection_closed

    def _connection_opened(self) -> None:
        self._channels += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def _connection_closed(self) -> None:
        self._channels -= 1
        if self._channels == 0:
            self._idle.set()

    async def _carry(self, host: str, port: int, stream: trio.abc.HalfCloseableStream,
                     kind: int, forward: str | None) -> bool:
        """Carry ``stream``; True when the session's socket pump took it over (and will
        close it), False when it is finished here (``carry`` closes it)."""
        opened = await self._open_channel(host, port, kind, forward, "; reset the connection")
        return opened is not None and await self._carry_opened(*opened, stream)

    async def open_channel(self, host: str, port: int, *, kind: int = mux.ChannelKind.TCP,
                           forward: str | None = None) -> ChannelStream | None:
        """Wait for a session (up to ``connect_wait_timeout``) and open a channel of
        ``kind`` to host:port on it, for a kind that answers its client first
        (kinds.py); None: no session, or it could not open one (logged)."""
        opened = await self._open_channel(host, port, kind, forward, "")
        return None if opened is None else opened[1]

    async def _open_channel(self, host: str, port: int, kind: int, forward: str | None,
                            then: str) -> tuple[TunnelTransport, ChannelStream] | None:
        """(the session, a channel on it), waiting up to ``connect_wait_timeout`` for a
        session; None, logged (``then``: what happens to the connection next)."""
        target = _target_text(host, port, kind)
        wait = self._config().connect_wait_timeout
        session = await self.sessions.wait(wait)
        if session is None:
            log.warning("no session to the relay within %g s; cannot open %s%s", wait,
                        target, then)
            return None
        try:
            return session, session.open_channel(host, port, kind=kind, forward=forward)
        except (SessionClosed, ChannelRefused) as exc:
            log.warning("cannot open a channel to %s: %s%s", target, exc, then)
            return None

    async def carry_channel(self, channel: ChannelStream,
                            stream: trio.abc.HalfCloseableStream) -> None:
        """``carry`` over a channel ``open_channel`` opened; owns ``stream``."""
        self._connection_opened()
        handed_over = False
        try:
            session = self.sessions.current
            if session is not None and session.channels.get(channel.channel_id) is not channel:
                session = None  # (its session ended: the channel is broken, splice ends it)
            handed_over = await self._carry_opened(session, channel, stream)
        finally:
            if not handed_over:
                await abort_stream(stream)
                self._connection_closed()

    async def _carry_opened(self, session: TunnelTransport | None, channel: ChannelStream,
                            stream: trio.abc.HalfCloseableStream) -> bool:
        while True:
            target = channel.destination
            finished = partial(self._channel_finished, target, channel)
            self.stats.channel_carried(channel, getattr(stream, "socket", None))  # (access log)
            if session is not None and session.attach(stream, channel, finished,
                                                      reopen=self._reopener(channel)):
                return True
            clean = await splice(stream, channel)
            again = await self._reopen(channel) if channel.retry is not None else None
            if again is None:
                break
            session, channel = again
        self._channel_finished(target, channel, closed=False)
        await close_spliced(stream, channel, clean)
        return False

    # -- a channel refused with GOING_AWAY: opened again on the next session ----------

    def _reopener(self, channel: ChannelStream) -> Callable[[socket.socket], None] | None:
        """For the socket pump (``attach``): where ``channel``'s socket goes if the relay
        refuses it with GOING_AWAY (``_carry_again``, in a task of its own)."""
        nursery = self.reopening
        if nursery is None:
            return None
        return lambda sock: nursery.start_soon(self._carry_again, sock, channel)

    async def _carry_again(self, sock: socket.socket, refused: ChannelStream) -> None:
        """Carry a pumped connection whose channel ``refused`` was refused with
        GOING_AWAY on the next session; reset it if none comes in time (as ``carry``)."""
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        handed_over = False
        try:
            again = await self._reopen(refused)
            if again is not None:
                handed_over = await self._carry_opened(*again, stream)
        finally:
            if not handed_over:
                await abort_stream(stream)
                self._connection_closed()

    async def _reopen(self, refused: ChannelStream
                      ) -> tuple[TunnelTransport, ChannelStream] | None:
        """``refused`` crossed its relay's GOAWAY: open it again on the next session,
        with what it had taken (reopen.py); None, logged: reset the connection."""
        return await reopen(refused, self.sessions, self._config().connect_wait_timeout,
                            self._stopping)

    def _channel_finished(
        self, target: str, channel: ChannelStream, *, closed: bool = True
    ) -> None:
        error = channel.error
        if isinstance(error, ChannelRefused):
            log.warning("relay could not connect to %s: %s", target, error)
        elif error is not None:
            log.info("channel to %s ended: %s", target, error)
        if closed:
            self._connection_closed()


def _target_text(host: str, port: int, kind: int) -> str:
    """``host:port``, or ``unix:/path`` for a unix socket target, as logs say it."""
    return f"unix:{host}" if kind == mux.ChannelKind.UNIX else f"{host}:{port}"
