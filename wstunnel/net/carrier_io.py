"""A session's reader, writer and pinger over its carrier (the stream it runs on now).

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
wake-up on every ping a relay's idle agents send. The reader calls the session's
socket pump's ``flush`` (net/pump.py) after each read's events, so DATA for one
socket that arrived in one read leaves in one system call.

``CarrierIO`` is the base class of ``TunnelTransport`` (net/transport.py), not a
part it holds: the tasks and the actions that feed them once per chunk
(``send_data``, ``acknowledge``) are one object, so the hot paths reach the
writer's wake-up without a hop. The reader hands DATA and WINDOW to channels
itself and every other event to ``dispatch_other`` (net/peer_events.py). A carrier
ends with ``_end``; a lost one (``_lost``) is replaced where the session is
resumable (net/resumption.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import mux, ws
from ..protocol import TunnelEvent, TunnelProtocol
from .keepalive import Due, KeepaliveAction, KeepaliveTimer, Scheduled, SessionKeepalive
from .plain_stream import Buffer, PlainSocketStream, nowait_sender
from .write_pacing import MIN_WRITE_SIZE, START_WRITE_SIZE, next_write_size, wait_paced

if TYPE_CHECKING:
    from .channel_stream import ChannelStream
    from .pump import SocketPump

__all__ = ["CarrierIO", "MAX_CONTROL_BACKLOG", "RECEIVE_SIZE"]

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


class CarrierIO:
    """Moves ``protocol``'s bytes over ``stream``, one carrier at a time (``_run_carrier``)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: TunnelProtocol,
        *,
        name: str,
        channels: dict[int, ChannelStream],
        dispatch_other: Callable[[TunnelEvent], None],
        keepalive: SessionKeepalive,
        keepalive_timer: KeepaliveTimer | None,
    ) -> None:
        self.stream = stream
        self.protocol = protocol
        self.name = name
        #: The open channels by id (the table's dict, looked up directly per record).
        self.channels = channels
        #: Every event but DATA and WINDOW (net/peer_events.py).
        self._dispatch_other = dispatch_other
        self._keepalive = keepalive
        #: A timer shared with other sessions (a relay's); None, or one not running:
        #: each carrier runs a timer of its own (``_start_keepalive``).
        self._keepalive_timer = keepalive_timer
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
        self._nursery: trio.Nursery | None = None  # (the current carrier's tasks)
        self._pump: SocketPump | None = None  # (made by the transport: _socket_pump)
        self._lost = False  # the carrier broke (no close handshake): resumable
        self._closing = False  # we close on purpose: never resume

    # -- one carrier ------------------------------------------------------------------

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

    # -- the writer's wake-up and event dispatch ---------------------------------------

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

    # -- ending -----------------------------------------------------------------------

    @property
    def end_reason(self) -> str | None:
        """Why the session ended (or is ending); None while it runs."""
        return self._end_reason

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

    def _resumable(self) -> bool:
        """A lost carrier would be replaced: never here (net/resumption.py says when)."""
        return False
