"""One tunnel session over a trio stream: a reader, a writer and a pinger.

Theory of operation: one session is three layers of one object. ``CarrierIO``
(net/carrier_io.py) runs the reader, the writer and the pinger over the current
carrier; ``Resumable`` (net/resumption.py) replaces a lost carrier; this class
adds the channels and the session's life (``run``, ``close``). The peer's
control records but its OPENs are acted on by a ``PeerEvents`` it holds
(net/peer_events.py).

Local TCP connections are carried by the session's ``SocketPump`` (net/pump.py)
once handed over with ``attach``: no task per channel.

Everything that acts on a channel from outside goes through the transport's
action methods (``accept``, ``refuse``, ``send_data``, ``send_eof``, ``reset``,
``acknowledge``): each calls the sans-IO protocol and wakes the writer, the
way websockets' ``send_context()`` pairs an action with its flush, so no caller
can forget the wake-up (a forgotten one stalls a channel with no error).
``ChannelStream`` and the pump know the transport only as a ``ChannelHost``;
the channel counts go to a ``SessionObserver`` (net/observer.py). The
channels are kept by a ``ChannelTable`` (net/channel_table.py), the keepalive
decided by a ``SessionKeepalive`` (net/keepalive.py); both act once per channel
or per interval, never per record.

``run()`` returns a one-line reason when the session is over; every channel
still open is then broken with ``SessionClosed`` so its users see
``BrokenResourceError`` rather than hanging.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import mux, ws
from ..errors import LocalProtocolError, SessionClosed
from ..protocol import TunnelProtocol
from . import pump
from .channel_stream import ChannelStream
from .channel_table import ChannelTable
from .keepalive import KeepaliveTimer, SessionKeepalive
from .peer_events import PeerEvents
from .resumption import Resumable, Resumer
from .udp_flow import DatagramBudget

if TYPE_CHECKING:
    from .observer import SessionObserver

__all__ = ["TunnelTransport", "OpenHandler", "OpenNowHandler", "AdmitHandler"]

log = logging.getLogger("wstunnel.session")

_CLEAN_CLOSE_CODES: Final = frozenset({ws.CloseCode.NORMAL, ws.CloseCode.GOING_AWAY})

OpenHandler = Callable[["TunnelTransport", ChannelStream], Awaitable[None]]
# Called synchronously for each admitted peer OPEN, instead of starting
# ``on_open`` in a task: None when it has dealt with the channel at once (accepted
# and attached it, or refused it), else an async function to finish it in a task.
OpenNowHandler = Callable[["TunnelTransport", ChannelStream],
                          "Callable[[], Awaitable[None]] | None"]
# Called synchronously for each peer OPEN before a task starts: None admits it,
# (reason, text) refuses it with OPEN_FAILED.
AdmitHandler = Callable[["TunnelTransport", mux.ChannelOpenRequested],
                        "tuple[mux.OpenFailure, str] | None"]


class TunnelTransport(Resumable):
    """Runs ``protocol`` over ``stream`` until either side ends the session."""

    #: Carry attached TCP connections with the socket pump where it is available
    #: (tests turn it off to cover splice, the fallback).
    use_pump = True

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: TunnelProtocol,
        *,
        name: str,
        on_open: OpenHandler | None = None,
        open_now: OpenNowHandler | None = None,
        admit: AdmitHandler | None = None,
        ping_interval: float = 20.0,
        ping_timeout: float = 10.0,
        observer: SessionObserver | None = None,
        resumer: Resumer | None = None,
        keepalive: KeepaliveTimer | None = None,
    ) -> None:
        channel_table = ChannelTable(observer)
        #: (made first: the reader hands it every event but DATA and WINDOW)
        self._peer_events = PeerEvents(self, channel_table, protocol, name=name,
                                       observer=observer, incoming=self._incoming)
        super().__init__(stream, protocol, resumer=resumer, name=name,
                         channels=channel_table.channels,
                         dispatch_other=self._peer_events.dispatch,
                         keepalive=SessionKeepalive(ping_interval, ping_timeout),
                         keepalive_timer=keepalive)
        self.observer = observer
        self._channel_table = channel_table
        #: What this session's UDP flows may hold back in their own queues together.
        self.datagram_budget = DatagramBudget(protocol.limits.max_queued_size)
        self._done = trio.Event()
        #: Who waits, before its process exits, for finished channels' last bytes still
        #: being written after this session ended (the relay's or agent's drain).
        self.last_bytes: pump.LastBytes | None = None
        self._pump_failed = False  # (the pump itself: made on first use, _socket_pump)
        self._session_nursery: trio.Nursery | None = None
        self._on_open = on_open
        self._open_now = open_now
        self._admit = admit

    # -- public API -------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> str:
        """Serve the session; return why it ended. A resumable session (``resumer``)
        whose carrier is lost waits for a new one (``_resume``) and goes on."""
        self._last_received = trio.current_time()
        try:
            async with trio.open_nursery() as session_nursery:
                self._session_nursery = session_nursery
                while True:
                    await self._run_carrier(task_status)
                    task_status = trio.TASK_STATUS_IGNORED
                    if not await self._resume():
                        break
                session_nursery.cancel_scope.cancel()
        finally:
            self._nursery = self._session_nursery = None
            self._channel_table.break_all(self.name, self._end_reason or "session ended",
                                          clean=self._ended_cleanly())
            self._detached.set()
            socket_pump, self._pump = self._pump, None
            if socket_pump is not None:  # (finished channels' last bytes still go)
                socket_pump.close_after_last_bytes(self.last_bytes)
            self._done.set()
        return self._end_reason or "session ended"

    @property
    def goaway_received(self) -> bool:
        """The peer sent GOAWAY: it opens no channel more (``wait_goaway``)."""
        return self._peer_events.goaway_received

    @property
    def role(self) -> mux.Role:
        return self.protocol.role

    @property
    def opened_total(self) -> int:
        """Channels opened in this session so far, both ways."""
        return self._channel_table.opened_total

    def open_channel(self, host: str, port: int, *, kind: int = mux.ChannelKind.TCP,
                     forward: str | None = None) -> ChannelStream:
        """Open a channel to host:port (a path and ``mux.PATH_KIND_PORT`` for a unix
        kind) for ``forward`` (its name, for logs); DATA may follow at once."""
        if not self.is_open or self.goaway_received:
            raise SessionClosed("the session to the relay is not usable for new channels")
        try:
            channel_id = self.protocol.open_channel(host, port, kind=mux.ChannelKind(kind))
        except LocalProtocolError as exc:
            raise SessionClosed(str(exc)) from exc
        channel = ChannelStream(self, channel_id, host, port, kind, forward)
        if self.protocol.pacer is not None:
            self.protocol.pacer.limit_channel(channel_id, forward)
        self._channel_table.add(channel)
        self.wake_writer()
        return channel

    def attach(
        self, stream: trio.abc.Stream, channel: ChannelStream,
        on_finished: Callable[[], None] = lambda: None, *, read_now: bool = False,
        reopen: Callable[[socket.socket], None] | None = None,
    ) -> bool:
        """Hand a local TCP connection to the session's socket pump, which carries
        ``channel`` over it from now on with no task of its own (net/pump.py).

        Returns False, and changes nothing, where there is no pump (no
        ``select.epoll``, the session is not running, or ``stream`` is not a
        ``trio.SocketStream``): carry it with ``splice`` instead. On True the pump
        owns the socket: the caller must not use or close ``stream`` any more;
        ``on_finished`` is called once the pump has closed it. ``read_now``: bytes
        the socket already holds are queued at once (the agent's first bytes then
        leave in the same write as the OPEN) instead of on the pump's next turn.
        ``reopen``: takes the socket back if the peer refuses the channel with
        GOING_AWAY (SocketPump.attach).
        """
        if not isinstance(stream, trio.SocketStream) or self._socket_pump() is None:
            return False
        sock = socket.socket(fileno=stream.socket.detach())
        return self.attach_socket(sock, channel, on_finished, read_now=read_now, reopen=reopen)

    def attach_socket(
        self, sock: socket.socket, channel: ChannelStream,
        on_finished: Callable[[], None] = lambda: None, *, read_now: bool = False,
        reopen: Callable[[socket.socket], None] | None = None,
    ) -> bool:
        """``attach`` for a connected standard-library socket (the relay's task-free
        dial); on False the caller still owns ``sock``."""
        socket_pump = self._socket_pump()
        if socket_pump is None:
            return False
        socket_pump.attach(sock, channel, on_finished, read_now=read_now, reopen=reopen)
        if read_now:
            self.wake_writer()  # (for what it read: the pump's own reads wake after each turn)
        return True

    @property
    def pumping(self) -> bool:
        """True while ``attach`` would hand sockets to the socket pump (made now if this
        is the session's first channel to attach)."""
        return self._socket_pump() is not None

    def _socket_pump(self) -> pump.SocketPump | None:
        """The session's socket pump, made when the first channel attaches: an idle
        session (a relay's many idle agents) then holds no epoll descriptor and no
        pump task (docs/PERFORMANCE.md, "One relay, many agents"). None: no pump
        (no epoll, turned off, the session is not running, or it could not be made)."""
        nursery = self._session_nursery
        if self._pump is not None or self._pump_failed or nursery is None:
            return self._pump
        if not (pump.AVAILABLE and self.use_pump):
            return None
        try:
            self._pump = pump.SocketPump(self, self.protocol)
        except OSError as exc:  # no epoll (out of file descriptors)
            self._pump_failed = True
            log.warning("no socket pump for this session (%s): each "
                        "channel runs as two tasks instead", exc)
            return None
        nursery.start_soon(self._pump.run)
        return self._pump

    # -- actions on a channel: each queues its record and wakes the writer ------------

    def accept(self, channel: ChannelStream) -> bool:
        """Accept a peer's OPEN (OPEN_OK); False, and nothing sent, when the session
        has ended or the peer reset the channel meanwhile: drop what was dialled."""
        if not self.is_open or channel.error is not None:
            return False
        self.protocol.accept_channel(channel.channel_id)
        if self.protocol.pacer is not None:  # (its forward is known by now: -R)
            self.protocol.pacer.limit_channel(channel.channel_id, channel.forward)
        self.wake_writer()
        return True

    def refuse(self, channel: ChannelStream, reason: mux.OpenFailure, text: str) -> None:
        """Refuse a peer's OPEN (OPEN_FAILED with ``reason`` and ``text``); nothing when
        the session has ended or the peer reset the channel meanwhile."""
        if self.is_open and channel.error is None:
            self.protocol.refuse_channel(channel.channel_id, reason, text)
            self.wake_writer()

    def send_capacity(self, channel: ChannelStream) -> int:
        return self.protocol.send_capacity(channel.channel_id)

    def send_data(self, channel: ChannelStream, data: bytes) -> None:
        protocol = self.protocol
        protocol.send_data(channel.channel_id, data)
        if protocol.wants_to_write():  # (wake_writer, inlined: once per chunk)
            self._wake.set()

    def send_eof(self, channel: ChannelStream) -> None:
        protocol = self.protocol
        # (a failed session has forgotten its channels; it breaks them as it ends)
        if protocol.failure is None:
            protocol.send_eof(channel.channel_id)
            self.wake_writer()

    def reset(self, channel: ChannelStream, code: mux.ResetCode, text: str, *,
              after_data: bool = False) -> bool:
        protocol = self.protocol
        if protocol.failure is not None:
            return False
        protocol.reset_channel(channel.channel_id, code, text, after_data=after_data)
        if self.observer is not None:
            self.observer.channel_reset(channel, code, text)
        self.wake_writer()
        return True

    def acknowledge(self, channel: ChannelStream, size: int) -> None:
        protocol = self.protocol
        protocol.acknowledge(channel.channel_id, size)
        if protocol.wants_to_write():  # (wake_writer, inlined: once per write to a socket)
            self._wake.set()

    # -- the session ------------------------------------------------------------------

    def go_away(self, text: str = "shutting down") -> None:
        """No new channels either way; those open may finish."""
        if self.is_open:
            self.protocol.go_away(0, text)
            self.wake_writer()

    async def wait_goaway(self) -> None:
        """Until the peer's GOAWAY: it opens no channel more, and ends the session once
        its open ones are done (a relay that drains)."""
        await self._peer_events.goaway.wait()

    async def wait_ended(self) -> None:
        """Wait until ``run()`` has finished."""
        await self._done.wait()

    async def wait_idle(self) -> None:
        """Wait until no channel is open."""
        await self._channel_table.wait_idle()

    async def close(
        self, code: int = ws.CloseCode.NORMAL, reason: str = "", timeout: float = 2.0
    ) -> None:
        """Close the WebSocket politely, then drop the transport."""
        self._closing = True
        if self._resuming and self._session_nursery is not None:
            self._end_reason = reason or "closed by us"
            self._session_nursery.cancel_scope.cancel()
            return
        if self.is_open:
            self.protocol.close(code, reason)
            self.wake_writer()
            with trio.move_on_after(timeout):
                await self._done.wait()
        self._end(reason or "closed by us")

    @property
    def close_confirmed(self) -> bool:
        """The peer's close came, saying normal or going away: it had read all that
        went before ours (a close we sent that no answer followed proves nothing)."""
        protocol = self.protocol
        return protocol.failure is None and protocol.close_code in _CLEAN_CLOSE_CODES

    # -- the peer's OPENs (its other control records: PeerEvents) ---------------------

    def _incoming(self, event: mux.ChannelOpenRequested) -> None:
        nursery = self._session_nursery  # (open tasks outlive a carrier: resumption)
        if (self._on_open is None and self._open_now is None) or nursery is None:
            self.protocol.refuse_channel(
                event.channel_id, mux.OpenFailure.FORBIDDEN, "not accepted here"
            )
            return
        refusal = self._admit(self, event) if self._admit is not None else None
        if refusal is not None:
            self.protocol.refuse_channel(event.channel_id, refusal[0], refusal[1])
            return
        channel = ChannelStream(self, event.channel_id, event.host, event.port, event.kind)
        self._channel_table.add(channel)
        if self._open_now is None:
            assert self._on_open is not None
            nursery.start_soon(self._on_open, self, channel)
            return
        rest = self._open_now(self, channel)
        if rest is not None:
            nursery.start_soon(rest)

    # -- ending -----------------------------------------------------------------------

    def _ended_cleanly(self) -> bool:
        """Closed on purpose (a close handshake saying normal or going away, or after
        the peer's GOAWAY), not lost: channels left then need no warning of loss."""
        if self._lost or self.protocol.failure is not None:
            return False
        return self.goaway_received or self.protocol.close_code in _CLEAN_CLOSE_CODES
