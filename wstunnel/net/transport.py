"""One tunnel session over a trio stream: a reader, a writer and a pinger.

Theory of operation: the reader task feeds bytes to the sans-IO
``TunnelProtocol`` and dispatches the events it yields to ``ChannelStream``
objects; every state change wakes the single writer task, which pulls
``data_to_send`` (control first, then fairly scheduled DATA chunks) and writes
it. Since the writer pulls at most one write's worth at a time and the kernel's
unsent bytes are capped by TCP_NOTSENT_LOWAT, queued bulk data waits in our
scheduler, where an interactive channel can overtake it. One write's worth
adapts to the link (net/write_pacing.py). One exception to "the writer
writes": a pong for an idle session on a socket of ours (ws:// or wss://), which
the reader sends itself while the writer is parked (``_answer_in_place``), saving the writer's
wake-up on every ping a relay's idle agents send.

Local TCP connections are carried by the session's ``SocketPump`` (net/pump.py)
once handed over with ``attach``: no task per channel; the reader calls the
pump's ``flush`` after each read's events, so DATA for one socket that arrived
in one read leaves in one system call.

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
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from .. import mux, ws
from ..errors import LocalProtocolError, SessionClosed
from ..protocol import TunnelEvent, TunnelProtocol
from ..replay import ReplayLimitReached
from . import pump
from .budget_warning import BudgetWarning
from .channel_stream import ChannelStream
from .channel_table import SESSION_LOSS, ChannelTable, end_channel
from .keepalive import Due, KeepaliveAction, KeepaliveTimer, Scheduled, SessionKeepalive
from .plain_stream import Buffer, PlainSocketStream, nowait_sender
from .udp_flow import DatagramBudget
from .write_pacing import MIN_WRITE_SIZE, START_WRITE_SIZE, next_write_size, wait_paced

if TYPE_CHECKING:
    from .observer import SessionObserver

__all__ = ["TunnelTransport", "OpenHandler", "OpenNowHandler", "AdmitHandler", "NewCarrier",
           "Resumer"]

log = logging.getLogger("wstunnel.session")

#: Largest read (as the largest write, write_pacing.MAX_WRITE_SIZE): 1 MiB, not
#: 256 KiB, took a quarter off the CPU per GiB uploading (docs/PERFORMANCE.md).
RECEIVE_SIZE = 1024 * 1024
#: The reader reads no more while this many control records wait to be sent (the
#: answers to a peer's OPENs, RESETs...), until half have gone: a peer that sends
#: and never reads is then held back by TCP instead of filling our memory.
MAX_CONTROL_BACKLOG: Final = 4096
# (globals, not attribute lookups through the enum class: a check per session and
# ping interval, on a relay with thousands of sessions)
_WAIT: Final = KeepaliveAction.WAIT
_PING: Final = KeepaliveAction.PING
_GIVE_UP: Final = KeepaliveAction.GIVE_UP
_PONG: Final = ws.PongReceived
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


@dataclass(frozen=True)
class NewCarrier:
    """A reconnected stream for a resumable session, and the peer's received count."""

    stream: trio.abc.Stream
    trailing: bytes
    peer_received: int
    #: The records travel framed (an HTTP transport) or as WebSocket messages; None:
    #: as on the carrier before.
    framed: bool | None = None


class Resumer(Protocol):
    """Brings a resumable session its next carrier (the agent reconnects, the relay
    waits for the agent's resume request)."""

    @property
    def grace(self) -> float:
        """How long a lost session waits for its next carrier."""

    async def new_carrier(self, transport: TunnelTransport, lost: str) -> NewCarrier | str:
        """The next carrier; or why there is none (the session then ends)."""


class TunnelTransport:
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
        self.stream = stream
        self.observer = observer
        self.protocol = protocol
        self.name = name
        self._channel_table = ChannelTable(observer)
        #: The open channels by id (the table's dict, looked up directly per record).
        self.channels = self._channel_table.channels
        self.goaway_received = False
        self._goaway = trio.Event()  # (set with goaway_received: wait_goaway)
        #: What this session's UDP flows may hold back in their own queues together.
        self.datagram_budget = DatagramBudget(protocol.limits.max_queued_size)
        self._on_open = on_open
        self._open_now = open_now
        self._admit = admit
        self._keepalive = SessionKeepalive(ping_interval, ping_timeout)
        #: A timer shared with other sessions (a relay's); None, or one not running:
        #: each carrier runs a timer of its own (``_start_keepalive``).
        self._keepalive_timer = keepalive
        self._wake = trio.Event()
        #: True only while the writer waits for ``_wake`` with nothing to do (not
        #: paced): the reader may then write a reply itself (``_answer_in_place``).
        self._writer_parked = False
        #: What the kernel did not take of the reader's reply: the writer sends it
        #: first, before anything else (this carrier's bytes only).
        self._unsent: list[Buffer] = []
        #: Set by the writer after a write, while the reader waits for the control
        #: backlog to go (``_wait_backlog_sent``).
        self._wrote: trio.Event | None = None
        self._last_received = 0.0
        self._end_reason: str | None = None
        self._nursery: trio.Nursery | None = None
        self._done = trio.Event()
        self._pump: pump.SocketPump | None = None  # made on first use (_socket_pump)
        self._pump_failed = False
        self._budget_warning = BudgetWarning()
        self._replay_warning = BudgetWarning()
        #: Resumption (replay.py): who brings a new carrier when this one is lost.
        self.resumer = resumer
        self._session_nursery: trio.Nursery | None = None
        self._lost = False  # the carrier broke (no close handshake): resumable
        self._resuming = False
        self._detached = trio.Event()  # set while resuming: the old carrier has stopped
        self._carrier_up = trio.Event()  # set while a carrier runs, and once the session ends
        self._carrier_up.set()
        self._closing = False  # we close on purpose: never resume

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
            if socket_pump is not None:
                socket_pump.close()
            self._done.set()
        return self._end_reason or "session ended"

    async def _run_carrier(self, task_status: Any) -> None:
        """Read, write and ping over the current stream until it ends."""
        self._lost = False
        keepalive = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # A stream carried by requests has work of its own while the session
                # runs (the agent's HTTP polling loops, agent/http_polling.py).
                background = getattr(self.stream, "run_background", None)
                if background is not None:
                    nursery.start_soon(background)
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                if self._keepalive.interval > 0:
                    keepalive = self._start_keepalive(nursery)
                task_status.started()
        finally:
            if keepalive is not None:
                keepalive.cancel()
        self._nursery = None

    async def _resume(self) -> bool:
        """After a carrier ended: True when a new one is in place (the session goes
        on), False when the session is over (``_end_reason`` says why)."""
        resumer, protocol = self.resumer, self.protocol
        if resumer is None or not self._lost or not self._resumable():
            return False
        lost = self._end_reason or "connection lost"
        count = len(self.channels)
        log.warning("%s: %s; keeping %d channel%s open to resume (up to %g s)", self.name,
                    lost, count, "" if count == 1 else "s", resumer.grace, extra=SESSION_LOSS)
        old_stream = self.stream
        self._end_reason, self._resuming = None, True
        self._carrier_up = trio.Event()
        protocol.carrier_broken()
        self._detached.set()
        try:  # (resuming until the new carrier is in place: no checkpoint in between)
            carrier = await resumer.new_carrier(self, lost)
            if not isinstance(carrier, str):
                try:
                    protocol.resume(carrier.trailing, carrier.peer_received,
                                    framed=carrier.framed)
                except LocalProtocolError as exc:
                    await trio.aclose_forcefully(carrier.stream)
                    carrier = str(exc)
                else:
                    self.stream = carrier.stream
                    self._last_received = trio.current_time()
        finally:
            self._resuming = False
            self._detached = trio.Event()
            self._carrier_up.set()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(old_stream)
        if isinstance(carrier, str):
            self._end_reason = carrier
            return False
        count = len(self.channels)
        log.info("%s: session resumed; %d channel%s on", self.name, count,
                 " carries" if count == 1 else "s carry")
        self.dispatch_local_events()  # (records that came with the answer: trailing data)
        if self._pump is not None:
            self._pump.flush()  # (as the reader does after each read's events)
        self._wake.set()
        return True

    async def wait_carrier(self) -> None:
        """Wait until the session is no longer resuming (resumed, or over)."""
        await self._carrier_up.wait()

    async def detach(self, reason: str) -> bool:
        """Stop the current carrier as lost (a resume request is here to replace it)
        and wait until it has stopped, so that nothing more is counted as received on
        it; False when the session ended instead."""
        if not self._resuming:
            self._lost = True
            self._end(reason)
        await self._detached.wait()  # (also set when the session ends)
        return self._resuming

    @property
    def is_open(self) -> bool:
        """The session is up (its carrier may be lost while it resumes: records then
        wait for the next one)."""
        if self._resuming:
            return True
        if self._end_reason is None:
            return not self.protocol.closed
        return self._lost and self._resumable()

    @property
    def resuming(self) -> bool:
        """The carrier is lost and a new one is awaited (or about to be)."""
        return self._resuming or (self._end_reason is not None and self._lost
                                  and self._resumable())

    @property
    def end_reason(self) -> str | None:
        """Why the session ended (or is ending); None while it runs."""
        return self._end_reason

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

    def wake_writer(self) -> None:
        """Call after queuing output; wakes the writer only when it has something to
        do (a writer woken for nothing costs a scheduler round: a short connection
        would pay several)."""
        if self.protocol.wants_to_write():
            self._wake.set()

    def dispatch_local_events(self) -> None:
        """Dispatch events our own actions produced (a FIN or RESET that finished
        a channel yields ChannelClosed); the reader does this after every read."""
        events = self.protocol.events_received()
        if events:
            self._dispatch(events)

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
        await self._goaway.wait()

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

    # -- tasks ------------------------------------------------------------------

    async def _reader(self) -> None:
        protocol = self.protocol
        receive_some = self.stream.receive_some
        # A big message's payload is read straight into its own buffer
        # (protocol.receive_buffer): no copy to join reads and cut it out.
        receive_into = getattr(self.stream, "receive_into", None)
        # (None for the HTTP transports' pipe: the writer sends everything)
        send_nowait = nowait_sender(self.stream)
        # After a read that raised no event (a ping, a pong) while nothing waited to
        # be written, the next bytes are not due soon: wait for them rather than try
        # a read that fails first. (A sender's reads of the peer's ACKs raise no
        # event either, and the next WINDOW is often there already.)
        wait_receivable = getattr(self.stream, "wait_receivable", None)
        quiet = False
        session = protocol.session
        while True:
            if session.control_backlog > MAX_CONTROL_BACKLOG:
                await self._wait_backlog_sent()
            into = protocol.receive_buffer() if receive_into is not None else None
            try:
                if quiet and into is None and wait_receivable is not None:
                    await wait_receivable()  # (not within a big frame: bulk reads at once)
                if into is None or receive_into is None:
                    data = await receive_some(RECEIVE_SIZE)
                else:
                    with into:
                        got = await receive_into(into)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                cause = exc.__cause__ or exc
                self._lost = True
                self._end(f"connection lost: {cause}")
                return
            self._last_received = trio.current_time()
            ended = not (data if into is None else got)
            if ended:
                protocol.receive_eof()
            elif into is None:
                protocol.receive_data(data)
            else:
                protocol.buffer_filled(got)
            events = protocol.events_received()
            # (idle: nothing but a pong came, and nothing waits to go; not a busy
            # sender's read of an ACK)
            quiet = self._writer_parked and (
                not events or (len(events) == 1 and type(events[0]) is _PONG))
            if events:  # (DATA, OPEN, WINDOW: always some; so never the branch below)
                self._dispatch(events)
            elif self._writer_parked and send_nowait is not None:
                self._answer_in_place(send_nowait)  # (a ping: the pong, without the writer)
                continue  # (it wakes the writer if need be; no event: nothing to pump)
            if self._pump is not None:
                self._pump.flush()
            self.wake_writer()
            if ended:
                self._lost = protocol.carrier_lost
                self._end(self._closed_reason("the peer closed the connection"))
                return
            if protocol.closed:
                return  # the writer flushes our close reply, then ends the session

    async def _wait_backlog_sent(self) -> None:
        """Read nothing more until half the control backlog has been written: what the
        peer sends only queues more answers for it, and it takes none (it stays
        held back while it does not read; the keepalive ends a peer that never does)."""
        protocol = self.protocol
        try:
            while (protocol.session.control_backlog > MAX_CONTROL_BACKLOG // 2
                   and not self._closing and not protocol.closed):
                self._wrote = wrote = trio.Event()
                self.wake_writer()
                await wrote.wait()
        finally:
            self._wrote = None

    def _answer_in_place(self, send_nowait: Callable[[list[Buffer]], list[Buffer]]) -> None:
        """Write the WebSocket's own frames (the reader's pong to a ping, the keepalive's
        ping) from the task that queued them, while the writer is parked: an idle
        session's ping exchange then costs no writer wake-up (two task steps and an
        epoll round, issue 22). Only when no record waits (the writer sizes and orders
        those); what the kernel does not take is left in ``_unsent`` for the writer,
        which sends it first. No checkpoint between the writer-parked check and the
        send: the writer cannot be sending."""
        protocol = self.protocol
        if self._unsent or not protocol.only_control_frames():
            self.wake_writer()  # (an earlier reply, records, a close: the writer's, in order)
            return
        try:
            self._unsent = send_nowait(protocol.parts_to_send(MIN_WRITE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._lost = True  # (as the writer's error path)
            self._end(f"connection lost while sending: {exc.__cause__ or exc}")
            return
        if self._unsent:
            self._wake.set()

    async def _writer(self) -> None:
        protocol = self.protocol
        send_parts = getattr(self.stream, "send_parts", None) or self._send_joined
        stream = self.stream  # (plain or TLS, ours: no checkpoint after a write it took)
        send_unchecked = (partial(stream.send_parts, checkpoint=False)
                          if isinstance(stream, PlainSocketStream) else None)
        clock = trio.current_time
        wait_writable = self.stream.wait_send_all_might_not_block
        write_size = START_WRITE_SIZE
        self._unsent = []  # (a lost carrier's: never onto the next one)
        try:
            while True:
                self._wake = trio.Event()
                started = clock()
                if write_size < START_WRITE_SIZE and protocol.wants_to_send():
                    # A slow link: choose what to send only once the kernel
                    # takes more, so a record that becomes ready meanwhile
                    # (an interactive chunk) is not stuck behind this write.
                    # The wait counts as part of the write's time.
                    await wait_writable()
                parts = protocol.parts_to_send(write_size)
                if parts:
                    if protocol.has_events:
                        # The cuts made room in the outbound budget (WindowUpdated):
                        # channels read from their sources again while this write runs.
                        self.dispatch_local_events()
                    # (a frame's header and payload go out without being joined)
                    if send_unchecked is None:
                        await send_parts(parts)
                    else:
                        await send_unchecked(parts)
                    written = sum(map(len, parts))
                    if self._wrote is not None:  # (the reader waits for the backlog to go)
                        self._wrote.set()
                    write_size = next_write_size(write_size, written, clock() - started)
                    if send_unchecked is not None and protocol.wants_to_write():
                        # Back-to-back writes: the others run in between. Otherwise the
                        # wait below is the checkpoint, and an interactive write costs
                        # one scheduler round, not two.
                        await trio.sleep(0)  # (a checkpoint)
                    continue
                if protocol.should_close_transport:
                    self._end(self._closed_reason("session closed"))
                    return
                if protocol.has_events:  # (ReplayLimitReached: the peer owes an ACK)
                    self.dispatch_local_events()
                if protocol.pacer is None:  # (only when idle: nothing per write)
                    self._writer_parked = True
                    try:
                        await self._wake.wait()
                    finally:
                        self._writer_parked = False
                    if self._unsent:  # (what the reader's reply left goes first)
                        unsent, self._unsent = self._unsent, []
                        await send_parts(unsent)
                else:
                    await wait_paced(protocol, protocol.pacer, self._wake)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._lost = True
            self._end(f"connection lost while sending: {exc.__cause__ or exc}")

    async def _send_joined(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """For streams that cannot gather (``send_parts``): one joined write."""
        await self.stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))

    def _start_keepalive(self, nursery: trio.Nursery) -> Scheduled:
        """Have this carrier's keepalive checked by the shared timer, or by a timer of
        its own running in ``nursery``; returns the entry to cancel when it ends."""
        timer = self._keepalive_timer
        if timer is None or not timer.running:
            timer = KeepaliveTimer()
            nursery.start_soon(timer.run)
        keepalive = self._keepalive
        return timer.schedule(self._keepalive_check, keepalive.start(trio.current_time()),
                              keepalive.slack)

    def _keepalive_check(self, now: float, deadline: float) -> Due:
        """The timer's check (``SessionKeepalive`` decides): ping, or acknowledge what
        came (a resumable session), or end the carrier as lost. Returns when to
        check next."""
        keepalive = self._keepalive
        action = keepalive.check(now, deadline, self._last_received)
        if action is _GIVE_UP:
            self._lost = True
            self._end(f"no answer to ping within {keepalive.timeout:g} s")
            return None
        if action is not _WAIT:
            self.protocol.send_ack()  # (a resumable session: what came, since the last)
            if action is _PING:
                self.protocol.ping(b"wstunnel")
            send_nowait = nowait_sender(self.stream) if self._writer_parked else None
            if send_nowait is not None:  # (the ping, or the ack: as the reader's pong)
                self._answer_in_place(send_nowait)
            else:
                self.wake_writer()
        return keepalive.due()

    # -- event dispatch -------------------------------------------------------------

    def _dispatch(self, events: list[TunnelEvent]) -> None:
        channels = self.channels
        for event in events:
            if type(event) is mux.DataReceived:
                channel = channels.get(event.channel_id)
                if channel is not None:
                    channel._deliver(event.data)
            elif type(event) is mux.WindowUpdated:
                channel = channels.get(event.channel_id)
                if channel is not None:
                    channel._wake_writable()
            else:
                self._dispatch_other(event)

    def _dispatch_other(self, event: TunnelEvent) -> None:
        """Everything but DATA and WINDOW. A channel is usable from open_channel on
        (early data), and a refusal arrives as its own event: ChannelOpened only
        marks the channel for the few that wait for it (``wait_opened``, a SOCKS
        proxy). SETTINGS, pongs (any input counts for the keepalive) and the close
        (the reader and writer see the protocol closed) need nothing."""
        if isinstance(event, (mux.EndOfStream, mux.ChannelOpenFailed, mux.ChannelReset)):
            channel = self.channels.get(event.channel_id)
            if channel is not None:
                end_channel(self.name, self.observer, channel, event)
        elif isinstance(event, mux.ChannelOpened):
            channel = self.channels.get(event.channel_id)
            if channel is not None:
                channel._opened()
        elif isinstance(event, mux.ChannelClosed):
            self._channel_table.remove(event.channel_id, self.protocol.pacer)
        elif isinstance(event, mux.ChannelOpenRequested):
            self._incoming(event)
        elif isinstance(event, mux.GoAwayReceived):
            self.goaway_received = True
            self._goaway.set()
            log.info("%s: the peer is going away (%s); no new channels", self.name,
                     event.text or "no reason")
        elif isinstance(event, mux.OutboundBudgetExhausted):
            self._budget_warning.report(self.name, event)
        elif isinstance(event, ReplayLimitReached):
            self._replay_warning.report(self.name, event)
        elif isinstance(event, mux.PeerOpenRefused):
            if self.observer is not None:
                self.observer.peer_open_refused(self, event.reason)
        elif isinstance(event, mux.SessionFailed):
            log.warning("%s: multiplexer protocol error from the peer: %s", self.name, event.text)

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

    def _closed_reason(self, default: str) -> str:
        code = self.protocol.close_code
        if code is None:
            return default
        reason = self.protocol.close_reason
        return f"closed with code {code}" + (f" ({reason})" if reason else "")

    def _end(self, reason: str) -> None:
        if self._end_reason is None:
            self._end_reason = reason
        if self._lost and self._resumable():
            self.protocol.carrier_broken()  # (records queue for the next carrier)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _ended_cleanly(self) -> bool:
        """Closed on purpose (a close handshake saying normal or going away, or after
        the peer's GOAWAY), not lost: channels left then need no warning of loss."""
        if self._lost or self.protocol.failure is not None:
            return False
        return self.goaway_received or self.protocol.close_code in _CLEAN_CLOSE_CODES

    def _resumable(self) -> bool:
        """A lost carrier would be replaced (not a session that is over)."""
        protocol = self.protocol
        return (self.resumer is not None and not self._closing
                and protocol.replay is not None and protocol.session.failure is None)
