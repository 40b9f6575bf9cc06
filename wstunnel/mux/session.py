"""The multiplexer for one session (one WebSocket), sans-IO.

Theory of operation
-------------------
Input is whole records (one per binary WebSocket message) through
:meth:`Session.receive_record`; facts come out of :meth:`events_received`.
Output is pulled one record at a time with :meth:`next_record`, so the I/O
layer asks for bytes only when it can write them and never holds a backlog:
what waits is either a small control record or application data still queued
on its channel, and that is bounded by send credit.

Ordering (enforced by :class:`Outbox`): SETTINGS is queued in the constructor,
so it is the first record out, and the peer's must be the first record in.
Control records leave before DATA.  None may overtake its channel's data
except RESET (which discards that data): a FIN is queued only once the data
has drained, and an OPEN or OPEN_OK is always queued before any DATA of its
channel.

Ids (:class:`ChannelTable`): the agent opens odd ids, the relay even ones,
each strictly increasing.  A record for an id that was used but is no longer
live is one of the races in docs/PROTOCOL.md and is dropped; a record for an
id never opened is a protocol error.

Memory, both ways.  Inbound: only ``acknowledge`` returns credit, so what
we buffer is bounded by the windows we grant; how ``max_buffered_size`` sizes
them, the pool they grow from and auto-tuning are in flow.py
(:func:`plan_windows`; the session keeps ``window_growth`` against the pool).
Outbound: we bound it, not the peer's windows: ``max_send_window`` per
channel, ``max_queued_size`` per session; :meth:`send_capacity` says so and
send_budget.py wakes whom it told to wait.

Peer violations never raise out of ``receive_record``: the session keeps the
exception in :attr:`failure`, replaces pending output with a GOAWAY carrying
the error code (never our message text), emits :class:`SessionFailed` and
ignores further input.  Every channel the application knew of ends with one
:class:`ChannelClosed`, except when the session fails.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from ..errors import LocalProtocolError, RemoteProtocolError, SessionClosed
from . import wire
from .channel import (
    PIECE_OVERHEAD_SIZE,
    Action,
    Channel,
    ChannelTable,
    Input,
    ReceiveState,
    SendState,
)
from .events import (
    ChannelClosed,
    ChannelOpened,
    ChannelOpenFailed,
    ChannelOpenRequested,
    ChannelReset,
    DataReceived,
    EndOfStream,
    Event,
    GoAwayReceived,
    PeerOpenRefused,
    SessionFailed,
    SettingsReceived,
    WindowUpdated,
)
from .flow import DEFAULT_MAX_AUTO_WINDOW, DEFAULT_OPEN_WINDOW, WindowPlan, plan_windows
from .scheduler import Outbox, Parts
from .send_budget import DEFAULT_MAX_QUEUED_SIZE, DEFAULT_MAX_SEND_WINDOW, SendBudget
from .wire import (
    DATA_HEADER_SIZE,
    DEFAULT_INITIAL_WINDOW,
    DEFAULT_MAX_CHUNK_SIZE,
    ChannelKind,
    ErrorCode,
    OpenFailure,
    ResetCode,
    decode_record,
    encode_record,
)

# The window plan (flow.py) and the budget defaults (send_budget.py) are
# importable from here too, where they were first defined.
__all__ = ["Role", "Session", "DEFAULT_MAX_CHANNELS", "DEFAULT_OPEN_WINDOW", "WindowPlan",
           "plan_windows", "DEFAULT_MAX_AUTO_WINDOW", "DEFAULT_MAX_SEND_WINDOW",
           "DEFAULT_MAX_QUEUED_SIZE"]

#: Live channels per session: 10,000 channels and room to spare.  What bounds
#: their memory is ``max_buffered_size`` (flow.py, plan_windows), not this.
DEFAULT_MAX_CHANNELS: Final = 10240
_DATA: Final = int(wire.RecordType.DATA)
_WINDOW: Final = int(wire.RecordType.WINDOW)
_WINDOW_SIZE: Final = 9
#: DATA payloads from this size on are delivered as memoryviews of the record.
_VIEW_MIN_SIZE: Final = 4096
_unpack_id: Final = struct.Struct("!I").unpack_from
_unpack_window: Final = struct.Struct("!II").unpack_from
_pack_window: Final = struct.Struct("!BII").pack
# Enum members as module constants: ``SendState.OPEN`` is a class attribute
# lookup through the enum metaclass (~65 ns on CPython 3.11), paid several
# times per chunk; a global is a dict hit.
_SEND_OPEN: Final = SendState.OPEN
_RECEIVE_OPEN: Final = ReceiveState.OPEN
_KINDS: Final = frozenset(int(kind) for kind in ChannelKind)
_ERROR_CODES: Final = frozenset(int(code) for code in ErrorCode)


class Role(enum.Enum):
    AGENT = "agent"  # opens odd channel ids
    RELAY = "relay"  # opens even channel ids


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise LocalProtocolError(f"{name} must be in {low}-{high}, got {value}")


class Session:
    """One multiplexed session; see the module docstring for the rules."""

    def __init__(self, role: Role, *, initial_window: int = DEFAULT_INITIAL_WINDOW,
                 max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
                 max_channels: int = DEFAULT_MAX_CHANNELS,
                 max_buffered_size: int | None = None, quantum: int | None = None,
                 max_window: int | None = None, solo_chunk_size: int | None = None,
                 max_send_window: int = DEFAULT_MAX_SEND_WINDOW,
                 max_queued_size: int = DEFAULT_MAX_QUEUED_SIZE) -> None:
        """Create a session; its SETTINGS record is already queued.

        Args:
            role: AGENT opens odd ids, RELAY even ids.
            initial_window: receive window we grant per channel
                (MIN_WINDOW..MAX_WINDOW).
            max_chunk_size: largest DATA payload we cut while channels compete
                for the link (also capped by the peer's value); the fairness grain.
                MIN_CHUNK_SIZE..MAX_CHUNK_SIZE.
            solo_chunk_size: largest DATA payload we accept (our SETTINGS say
                so), and the largest we cut for a channel that is the only one
                with data ready (capped by the peer's value and ``max_size``);
                default the larger of max_chunk_size and DEFAULT_SOLO_CHUNK_SIZE.
                The WebSocket message limit must be at least max_record_size.
            max_channels: live channels, both directions together.
            max_buffered_size: bound on received-but-unacknowledged bytes.  When
                it covers max_channels x initial_window, windows open at
                initial_window; otherwise they open at DEFAULT_OPEN_WINDOW and
                grow from what is left (flow.py), and the channel
                limit is at most 3/4 of max_buffered_size // DEFAULT_OPEN_WINDOW.
            quantum: bytes per scheduler turn; default one chunk.
            max_window: ceiling for auto-tuned receive windows (initial_window..
                MAX_WINDOW; default DEFAULT_MAX_AUTO_WINDOW, at least
                initial_window).  A channel whose peer runs out of credit while
                our reader keeps up doubles its window, up to this; all
                growth together stays within the pool (flow.py).
                ``max_window=initial_window`` turns auto-tuning off.
            max_send_window: the most one channel queues (MIN_WINDOW..MAX_WINDOW),
                whatever window the peer grants it; the rest of its credit
                waits until the queue is below half of this.
            max_queued_size: what all queues together may hold (MIN_WINDOW..
                2**62; ``held_size``): our memory bound for the outbound
                direction, whatever the peer grants and however little it reads.

        Raises:
            LocalProtocolError: an option is out of range.
        """
        _check_range("initial_window", initial_window, wire.MIN_WINDOW, wire.MAX_WINDOW)
        _check_range("max_chunk_size", max_chunk_size, wire.MIN_CHUNK_SIZE, wire.MAX_CHUNK_SIZE)
        if solo_chunk_size is None:
            solo_chunk_size = max(max_chunk_size, wire.DEFAULT_SOLO_CHUNK_SIZE)
        _check_range("solo_chunk_size", solo_chunk_size, max_chunk_size, wire.MAX_CHUNK_SIZE)
        _check_range("max_channels", max_channels, 1, 1 << 30)
        _check_range("max_send_window", max_send_window, wire.MIN_WINDOW, wire.MAX_WINDOW)
        _check_range("max_queued_size", max_queued_size, wire.MIN_WINDOW, 1 << 62)
        self.max_send_window = max_send_window
        self.max_queued_size = max_queued_size
        self.role = role
        self.initial_window = initial_window
        self.max_chunk_size = max_chunk_size
        #: Largest DATA payload we accept.
        self.max_receive_chunk_size = solo_chunk_size
        if max_buffered_size is not None:
            _check_range("max_buffered_size", max_buffered_size, initial_window, 1 << 62)
        plan = plan_windows(max_channels, initial_window, max_buffered_size)
        #: What our SETTINGS announce: every channel's receive window at OPEN.
        self.open_window = plan.open_window
        self.max_channels = plan.max_channels
        self.max_buffered_size = plan.max_buffered_size
        self._growth_budget = plan.pool
        if max_window is None:
            max_window = max(initial_window, DEFAULT_MAX_AUTO_WINDOW)
        _check_range("max_window", max_window, initial_window, wire.MAX_WINDOW)
        self.max_window = max_window
        #: Bytes all live windows together have grown beyond open_window.
        self.window_growth = 0
        self.failure: RemoteProtocolError | None = None
        self.peer_settings: wire.Settings | None = None
        self._table = ChannelTable(opens_odd=role is Role.AGENT)
        self._channels = self._table.live
        self._events: list[Event] = []
        chunk_size = wire.MIN_CHUNK_SIZE  # what the peer surely accepts until its SETTINGS
        self._fixed_quantum = quantum is not None
        if quantum is not None:
            _check_range("quantum", quantum, 1, 1 << 30)
        self._budget = budget = SendBudget(self._channels, self._emit,
                                           max_send_window=max_send_window,
                                           max_queued_size=max_queued_size)
        self._outbox = budget.outbox = Outbox(
            self._channels, quantum=quantum or chunk_size, chunk_size=chunk_size,
            on_drained=self._queue_fin, on_room=budget.on_room)
        self._outbox.adaptive_quantum = quantum is None
        self._control = self._outbox.control
        # The scheduler's containers, for the per-chunk fast paths (they are
        # cleared in place, never replaced).
        self._drr = self._outbox.drr
        self._ready = self._drr.queue
        self._ready_set = self._drr.members
        self._settings = encode_record(
            wire.Settings(wire.VERSION, self.open_window, solo_chunk_size))
        self._control.append(self._settings)
        self._running = False  # the peer's SETTINGS arrived and we have not failed
        self._peer_window = wire.MIN_WINDOW  # assumed until its SETTINGS arrive
        self._goaway_sent = False
        self._goaway_received = False
        #: Peer OPENs refused here without the application hearing of them (after
        #: GOAWAY, past max_channels, an unknown kind), by reason: for its metrics
        #: and logs. Only ever grows.
        self.refused_opens: dict[OpenFailure, int] = {}
        #: RESET records that wait for their channel's queued data (reset_channel's
        #: ``after_data``), sent by _queue_fin in place of the FIN.
        self._resets_after_data: dict[int, bytes] = {}

    # -- state and output ------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once terminal: failed, or GOAWAY either way and no live channel.

        Drain :meth:`next_record` (the GOAWAY, final RESETs) before closing.
        """
        if self.failure is not None:
            return True
        return (self._goaway_sent or self._goaway_received) and not self._channels

    @property
    def buffered_size(self) -> int:
        """Received bytes the application has not acknowledged (live channels)."""
        return sum(ch.window.unacknowledged for ch in self._channels.values())

    @property
    def queued_size(self) -> int:
        """Bytes given to :meth:`send_data` and not yet cut into records."""
        return sum(ch.queued_size for ch in self._channels.values())

    @property
    def control_backlog(self) -> int:
        """Control records queued and not sent yet. Most answer a record of the peer's
        (OPEN_OK or OPEN_FAILED per OPEN, RESET, WINDOW): a transport reads no more
        while too many wait, or a peer that sends OPENs and never reads would make
        them pile up without bound (net/transport.py)."""
        return len(self._control)

    @property
    def held_size(self) -> int:
        """What the send queues hold, as ``max_queued_size`` counts it: queued bytes,
        PIECE_OVERHEAD_SIZE per queued piece, and the sent part of a piece cut
        into (its rest still keeps it in memory)."""
        return self._outbox.held_size

    @property
    def budget_exhaustions(self) -> int:
        """OutboundBudgetExhausted episodes so far."""
        return self._budget.exhaustions

    @property
    def has_events(self) -> bool:
        """True when :meth:`events_received` has something (a cheap check for the
        writer: a cut that makes room emits WindowUpdated)."""
        return bool(self._events)

    @property
    def ready_count(self) -> int:
        """Channels waiting for a scheduler turn (the scheduler's queue depth)."""
        return len(self._outbox.drr)

    @property
    def max_record_size(self) -> int:
        """Largest record we accept: size the WebSocket message limit from it."""
        return self.max_receive_chunk_size + DATA_HEADER_SIZE

    def channel_ids(self) -> list[int]:
        """Ids of the live channels."""
        return list(self._channels)

    def events_received(self) -> list[Event]:
        """Return and clear the events produced so far."""
        events, self._events = self._events, []
        return events

    def _emit(self, event: Event) -> None:
        """For the SendBudget: ``_events`` is replaced, not cleared, when drained."""
        self._events.append(event)

    def wants_to_send(self) -> bool:
        """True when :meth:`next_record` would return a record."""
        return self._outbox.wants_to_send()

    def next_record(self, max_size: int | None = None) -> bytes | None:
        """Return the next record to send (one binary message), or None.

        Control records come first, then one DATA chunk from the channel whose
        turn it is.  Call until None, and again after any input or local call.
        ``max_size`` caps the DATA payload below the chunk size and ends that
        channel's turn (for slow links; see Outbox.next_record).
        """
        return self._outbox.next_record(max_size)

    def next_record_parts(self, max_size: int | None = None) -> Parts | None:
        """Like :meth:`next_record`, as (record header, payload) not yet joined:
        the WebSocket layer frames the two without copying a chunk once more."""
        return self._outbox.next_parts(max_size)

    def next_control_record(self) -> bytes | None:
        """The next control record alone, DATA left queued: a rate limit (pacing.py)
        holds DATA back, never control."""
        control = self._control
        return control.popleft() if control else None

    def ready_channel(self) -> int | None:
        """The channel whose turn it is (None: no channel has data and credit)."""
        return self._ready[0] if self._ready else None

    def ready_channel_ids(self) -> list[int]:
        """The channels waiting for a turn, in turn order."""
        return list(self._ready)

    def skip_turn(self) -> None:
        """The channel whose turn it is goes to the back of the round, sending
        nothing (a rate limit holds its forward back: pacing.py)."""
        self._drr.end_turn()

    # -- input -----------------------------------------------------------------

    def receive_record(self, record: bytes | bytearray | memoryview) -> None:
        """Process one record from the peer; then drain events and output.

        The record is kept, not copied: DataReceived.data may be a read-only
        view of it, so the caller must not modify ``record`` afterwards.
        Never raises for peer garbage: see :attr:`failure` and SessionFailed.
        """
        try:
            if not self._running:  # before the peer's SETTINGS, or after a failure
                if self.failure is None:
                    self._apply_settings(wire.check_peer_settings(decode_record(bytes(record))))
                return
            length = len(record)
            if length > DATA_HEADER_SIZE and record[0] == _DATA:
                # Hot path, inlined: DATA on an open receive half, (OPEN, DATA) in the table.
                size = length - DATA_HEADER_SIZE
                channel_id = _unpack_id(record, 1)[0]
                ch = self._channels.get(channel_id)
                if (ch is None or size > self.max_receive_chunk_size
                        or ch.receive_state is not _RECEIVE_OPEN):
                    self._receive_odd_data(ch, channel_id, size)
                    return
                window = ch.window  # ReceiveWindow.receive inlined, with its check:
                available = window.available - size
                if available < 0:
                    window.receive(size)  # raises FlowControlError
                window.available = available
                window.unacknowledged += size
                # A large payload is a view, not a copy. Small ones are copied
                # so that they never pin a large receive buffer in memory.
                payload: bytes | memoryview
                if size >= _VIEW_MIN_SIZE:
                    view = memoryview(record)
                    if type(record) is not bytes:  # a view of bytes is read-only already
                        view = view.toreadonly()
                    payload = view[DATA_HEADER_SIZE:]
                else:
                    payload = bytes(record[DATA_HEADER_SIZE:])
                self._events.append(DataReceived(channel_id, payload))
            elif length == _WINDOW_SIZE and record[0] == _WINDOW:  # the second hottest
                channel_id, increment = _unpack_window(record, 1)
                ch = self._channels.get(channel_id)
                # Fast path: credit for an OPEN send half.  Inlines _receive_window
                # and SendCredit.grant with their bounds (1 <= increment, credit
                # stays <= MAX_WINDOW); anything else, errors included, goes the
                # long way.
                if ch is not None and ch.send_state is _SEND_OPEN and increment > 0:
                    credit = ch.credit
                    total = credit.credit + increment
                    if total <= wire.MAX_WINDOW:
                        credit.credit = total
                        if total > credit.limit:
                            credit.limit = total
                        queued = ch.queued_size
                        cap = self.max_send_window
                        self._events.append(WindowUpdated(
                            channel_id, (total if total < cap else cap) - queued))
                        if queued and channel_id not in self._ready_set:  # DRR.add
                            self._ready_set.add(channel_id)
                            self._ready.append(channel_id)
                        return
                self._receive_window(channel_id, increment)
            else:
                self._dispatch(decode_record(bytes(record)))
        except RemoteProtocolError as exc:
            self._fail(exc)

    def _receive_odd_data(self, ch: Channel | None, channel_id: int, size: int) -> None:
        """DATA that is too big, for a gone channel, or on a half not OPEN."""
        if size > self.max_receive_chunk_size:
            raise RemoteProtocolError(f"DATA of {size} bytes exceeds "
                                      f"{self.max_receive_chunk_size}",
                                      code=int(ErrorCode.RECORD_SIZE_ERROR))
        if ch is None:
            self._table.check_known(channel_id)  # late DATA after our RESET: dropped
            return
        ch.receive(Input.DATA)  # raises: only (OPEN, DATA) is in the table

    def _apply_settings(self, settings: wire.Settings) -> None:
        """Adopt the peer's limits; top up channels opened on the assumed window."""
        self.peer_settings = settings
        self._running = True
        self._peer_window = settings.initial_window
        self._outbox.chunk_size = min(self.max_chunk_size, settings.max_chunk_size)
        self._outbox.solo_chunk_size = min(self.max_receive_chunk_size, settings.max_chunk_size)
        if not self._fixed_quantum:
            self._drr.set_quantum(self._outbox.chunk_size)
        self._events.append(SettingsReceived(settings.version, settings.initial_window,
                                             settings.max_chunk_size))
        for ch in self._channels.values():  # all ours: the peer could not open any yet
            if ch.credit.resize(self._peer_window) and ch.send_state is SendState.OPEN:
                self._events.append(WindowUpdated(ch.channel_id, self._budget.capacity(ch)))
            if ch.ready():
                self._drr.add(ch.channel_id)

    def _dispatch(self, record: wire.Record) -> None:
        if isinstance(record, wire.Settings):
            raise RemoteProtocolError("SETTINGS sent twice", code=int(ErrorCode.PROTOCOL_ERROR))
        if isinstance(record, wire.GoAway):
            self._goaway_received = True
            self._events.append(GoAwayReceived(record.code, record.text, record.last_channel_id))
            return
        if isinstance(record, wire.Open):
            self._receive_open(record)
            return
        ch = self._channels.get(record.channel_id)
        if ch is None:
            self._table.check_known(record.channel_id)  # a documented late-record race
        elif isinstance(record, wire.Window):
            self._receive_window(record.channel_id, record.increment)
        elif isinstance(record, wire.Fin):
            ch.receive(Input.FIN)
            self._events.append(EndOfStream(ch.channel_id))
            if ch.finished:
                self._forget(ch)
        elif isinstance(record, wire.Reset):
            ch.receive(Input.RESET)
            self._events.append(ChannelReset(ch.channel_id, record.code, record.text))
            self._forget(ch)
        elif isinstance(record, wire.OpenOk):
            ch.receive(Input.OPEN_OK)
            self._budget.release_early(ch)
            self._events.append(ChannelOpened(ch.channel_id))
            self._top_up(ch)
        elif isinstance(record, wire.OpenFailed):
            ch.receive(Input.OPEN_FAILED)
            self._events.append(self._open_failed(ch, record))
            self._forget(ch)
        # Data never gets here: a DATA record too short for the fast path fails to decode

    def _open_failed(self, ch: Channel, record: wire.OpenFailed) -> ChannelOpenFailed:
        """The event for a refused OPEN of ours. GOING_AWAY means the peer never acted
        on it (PROTOCOL.md section 7): the bytes given to send_data since, and
        whether send_eof was called, go with it, to be sent again on another session
        (not if a local reset is pending: the opener's side is already gone)."""
        retry = None
        if (record.reason == OpenFailure.GOING_AWAY
                and ch.channel_id not in self._resets_after_data):
            retry = ch.unsent_since_open()
        return ChannelOpenFailed(ch.channel_id, record.reason, record.text, retry_data=retry,
                                 retry_eof=retry is not None and ch.send_state is not _SEND_OPEN)

    def _receive_open(self, record: wire.Open) -> None:
        channel_id = record.channel_id
        self._table.claim_remote(channel_id)
        reason = self._open_refusal(record.kind)
        if reason is not None:  # answered here: the application never hears of it
            self._control.append(encode_record(wire.OpenFailed(channel_id, reason, reason.name)))
            self.refused_opens[reason] = self.refused_opens.get(reason, 0) + 1
            self._events.append(PeerOpenRefused(channel_id, reason))
            return
        self._channels[channel_id] = Channel(
            channel_id, opener=False, send_window=self._peer_window,
            receive_window=self.open_window)
        self._events.append(ChannelOpenRequested(channel_id, ChannelKind(record.kind),
                                                 record.host, record.port))

    def _open_refusal(self, kind: int) -> OpenFailure | None:
        """Why a peer OPEN is refused without asking the application, if it is."""
        if self._goaway_sent or self._goaway_received:
            return OpenFailure.GOING_AWAY
        if len(self._channels) >= self.max_channels:
            return OpenFailure.LIMIT_REACHED
        if kind not in _KINDS:
            return OpenFailure.UNSUPPORTED_KIND
        return None

    def _receive_window(self, channel_id: int, increment: int) -> None:
        if not 1 <= increment <= wire.MAX_WINDOW:
            raise RemoteProtocolError(f"WINDOW increment {increment} out of range",
                                      code=int(ErrorCode.FLOW_CONTROL_ERROR))
        ch = self._channels.get(channel_id)
        if ch is None:
            self._table.check_known(channel_id)  # e.g. credit for data sent before our RESET
            return
        state = ch.send_state
        if state is not SendState.OPEN and ch.send(Input.WINDOW) is Action.IGNORE:
            return  # (OPEN, WINDOW) -> ADD_CREDIT needs no lookup on the hot path
        ch.credit.grant(increment)
        if state is SendState.OPEN:
            self._events.append(WindowUpdated(channel_id, self._budget.capacity(ch)))
        if ch.queued_size:
            self._drr.add(channel_id)

    def fail(self, exc: RemoteProtocolError) -> None:
        """The layer above found that the peer broke a rule (a bad ACK, replay.py):
        fail as for a bad record (GOAWAY with ``exc.code``, SessionFailed)."""
        if self.failure is None:
            self._fail(exc)

    def _fail(self, exc: RemoteProtocolError) -> None:
        """Go terminal: keep SETTINGS if still unsent, then only our GOAWAY goes out."""
        self.failure = exc
        self._running = False
        keep_settings = bool(self._control) and self._control[0] is self._settings
        self._outbox.clear()
        self._budget.clear()
        if keep_settings:
            self._control.append(self._settings)
        code = exc.code if exc.code in _ERROR_CODES else int(ErrorCode.PROTOCOL_ERROR)
        text = ErrorCode(code).name.lower().replace("_", " ")  # never our exception text
        self._control.append(encode_record(wire.GoAway(self._table.last_remote_id, code, text)))
        self._goaway_sent = True
        self._channels.clear()
        self._resets_after_data.clear()
        self.window_growth = 0
        self._events.append(SessionFailed(code, str(exc)))

    # -- local actions ---------------------------------------------------------

    def _live(self, channel_id: int) -> Channel:
        ch = self._channels.get(channel_id)
        if ch is not None:
            return ch
        if self.failure is not None:
            raise SessionClosed("the session failed", code=self.failure.code)
        state = "closed" if self._table.was_used(channel_id) else "never opened"
        raise LocalProtocolError(f"channel {channel_id} is {state}")

    def _check_gone(self, channel_id: int) -> None:
        """Tolerate a late local call on a gone channel, not on a never-opened one."""
        if self.failure is None and not self._table.was_used(channel_id):
            raise LocalProtocolError(f"channel {channel_id} was never opened")

    def _forget(self, ch: Channel) -> None:
        del self._channels[ch.channel_id]
        if self._resets_after_data:
            self._resets_after_data.pop(ch.channel_id, None)
        self.window_growth -= ch.window.size - self.open_window
        self._drr.discard(ch.channel_id)
        if ch.wake_below or ch.queued_size or ch.early:
            self._budget.release(ch)
        self._events.append(ChannelClosed(ch.channel_id))

    def _queue_fin(self, ch: Channel) -> None:
        if self._resets_after_data:
            reset = self._resets_after_data.pop(ch.channel_id, None)
            if reset is not None:  # the data went out; the RESET follows it, not a FIN
                ch.send(Input.RESET_SENT)
                self._control.append(reset)
                self._forget(ch)
                return
        ch.send(Input.DRAINED)
        self._control.append(encode_record(wire.Fin(ch.channel_id)))
        if ch.finished:
            self._forget(ch)

    def open_channel(self, host: str, port: int, *, kind: ChannelKind = ChannelKind.TCP,
                     early_data: bytes = b"") -> int:
        """Open a channel to ``host:port`` at the peer; returns its id.

        ``early_data`` (at most the peer's initial window, or MIN_WINDOW until
        its SETTINGS arrive, and what ``max_send_window`` and the outbound
        budget leave) goes right behind the OPEN, saving a round trip.
        Then drain :meth:`next_record`; expect ChannelOpened or ChannelOpenFailed.

        Raises:
            SessionClosed: the session failed, or GOAWAY was sent or received.
            ChannelRefused: the channel limit is reached (reason LIMIT_REACHED).
            LocalProtocolError: bad host, port or kind, or too much early data.
        """
        if self.failure is not None or self._goaway_sent or self._goaway_received:
            raise SessionClosed("the session accepts no new channels (GOAWAY or failure)")
        room = min(self._peer_window, self.max_send_window,
                   self.max_queued_size - self._outbox.held_size - PIECE_OVERHEAD_SIZE)
        if early_data and memoryview(early_data).nbytes > room:
            raise LocalProtocolError("early data exceeds what a new channel may queue "
                                     f"({room} bytes: the peer's initial window, "
                                     "max_send_window or the outbound budget)")
        channel_id = self._table.next_local_id
        record = encode_record(wire.Open(channel_id, kind, host, port))  # validates first
        self._table.claim_local(self.max_channels)
        self._channels[channel_id] = Channel(channel_id, opener=True,
                                             send_window=self._peer_window,
                                             receive_window=self.open_window)
        self._control.append(record)
        if early_data:
            self.send_data(channel_id, early_data)
        return channel_id

    def accept_channel(self, channel_id: int) -> None:
        """Accept a ChannelOpenRequested channel: queues OPEN_OK.

        A no-op if the channel is already gone (the opener reset it while we
        were connecting: ChannelReset is in the events).

        Raises:
            LocalProtocolError: not a channel awaiting an answer.
        """
        ch = self._channels.get(channel_id)
        if ch is None:
            self._check_gone(channel_id)
            return
        ch.send(Input.ACCEPT)
        self._control.append(encode_record(wire.OpenOk(channel_id)))
        self._top_up(ch)

    def _top_up(self, ch: Channel) -> None:
        """A channel just opened at open_window: add the rest of initial_window
        (one WINDOW) while the pool has it.  Sent once the peer knows the
        channel is open both ways (after our OPEN_OK or its OPEN_OK): the
        acceptor's send half is PENDING until then, where WINDOW is illegal."""
        extra = self.initial_window - self.open_window
        if (extra and self.window_growth + extra <= self._growth_budget
                and ch.receive_state is _RECEIVE_OPEN):  # (no WINDOW after the peer's FIN)
            self.window_growth += extra
            ch.window.enlarge(extra)
            self._control.append(_pack_window(_WINDOW, ch.channel_id, extra))

    def refuse_channel(self, channel_id: int, reason: OpenFailure, text: str = "") -> None:
        """Refuse a ChannelOpenRequested channel: queues OPEN_FAILED, emits ChannelClosed.

        A no-op if the channel is already gone, like :meth:`accept_channel`.
        """
        ch = self._channels.get(channel_id)
        if ch is None:
            self._check_gone(channel_id)
            return
        ch.send(Input.REFUSE)
        self._control.append(encode_record(wire.OpenFailed(channel_id, reason, text)))
        self._forget(ch)

    def send_capacity(self, channel_id: int) -> int:
        """Bytes :meth:`send_data` may still queue on the channel (0 once gone).

        The least of: the channel's credit, ``max_send_window``, and what is
        left of ``max_queued_size``, less what is queued.  Call it when about
        to read from the channel's source: a channel told 0 while its credit
        allows more (the cap or the budget holds it back) gets WindowUpdated
        once there is room again, as for credit, so wait for that.  The
        first channel the budget holds back emits OutboundBudgetExhausted.
        """
        ch = self._channels.get(channel_id)
        if ch is None or ch.send_state is not _SEND_OPEN:
            return 0
        credit = ch.credit.credit
        cap = self.max_send_window
        own = (credit if credit < cap else cap) - ch.queued_size
        left = self.max_queued_size - self._outbox.held_size - PIECE_OVERHEAD_SIZE
        if own <= left or own <= 0:
            if own <= 0 and credit > cap and not ch.wake_below:
                self._budget.hold_at_cap(ch)
            return own
        if left > 0:
            return left
        self._budget.wait(channel_id)
        return 0

    def send_data(self, channel_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` (bytes are not copied); then drain :meth:`next_record`.

        Raises:
            LocalProtocolError: past :meth:`send_capacity`, after send_eof, or on
                a channel that is not open.
            SessionClosed: the session failed.
        """
        ch = self._channels.get(channel_id)
        if ch is not None and ch.send_state is _SEND_OPEN and type(data) is bytes:
            # Fast path, once per chunk: Channel.queue and DeficitRoundRobin.add
            # inlined for bytes (kept without a copy) on an OPEN send half, with
            # the capacity checks (credit, max_send_window, the budget); past
            # capacity, the slow path raises.
            size = len(data)
            queued = ch.queued_size + size
            outbox = self._outbox
            held = outbox.held_size + size + PIECE_OVERHEAD_SIZE
            if (queued <= ch.credit.credit and queued <= self.max_send_window
                    and held <= self.max_queued_size):
                if size:  # (so the credit is not 0)
                    ch.pieces.append(data)
                    ch.queued_size = queued
                    outbox.held_size = held
                    if channel_id not in self._ready_set:
                        if queued != size:  # the queue was not empty: DRR.add
                            self._ready_set.add(channel_id)
                            self._ready.append(channel_id)
                        else:  # the queue was empty: a sparse flow goes first
                            self._drr.add_first(channel_id)
                return
        ch = ch or self._live(channel_id)
        was_empty = not ch.queued_size
        size = memoryview(data).nbytes
        if size and ch.send_state is _SEND_OPEN:  # (otherwise Channel.queue raises)
            capacity = self.send_capacity(channel_id)
            if size > capacity:
                raise LocalProtocolError(
                    f"send_data of {size} bytes exceeds send_capacity {capacity}")
        held = ch.held_size
        ch.queue(data)
        self._outbox.held_size += ch.held_size - held
        if ch.queued_size and ch.credit.credit:
            if was_empty:
                self._drr.add_first(channel_id)
            else:
                self._drr.add(channel_id)

    def send_eof(self, channel_id: int) -> None:
        """Half-close: FIN goes out after the queued data (idempotent)."""
        ch = self._live(channel_id)
        if ch.send(Input.SEND_EOF) is Action.QUEUE_FIN and not ch.queued_size:
            self._queue_fin(ch)

    def reset_channel(self, channel_id: int, code: ResetCode = ResetCode.CANCELLED,
                      text: str = "", *, after_data: bool = False) -> None:
        """Abort the channel both ways: queued data is dropped, RESET goes out first.

        ``after_data``: the data already queued goes out first and the RESET
        follows it in place of a FIN (the send half accepts nothing more from
        now on). That is how a local socket that was reset after it sent data
        reaches the far end: those bytes, then the reset, as TCP delivers them.
        Queued data never exceeds the credit, so it cannot hold the RESET back
        for want of WINDOW.

        A no-op for a channel that is already gone (resets race freely).

        Raises:
            LocalProtocolError: the channel awaits accept/refuse (refuse it instead).
        """
        ch = self._channels.get(channel_id)
        if ch is None:
            self._check_gone(channel_id)
            return
        if after_data and ch.queued_size and (ch.send_state is _SEND_OPEN
                                               or ch.send_state is SendState.FIN_QUEUED):
            self._resets_after_data[channel_id] = encode_record(
                wire.Reset(channel_id, code, text))
            ch.send(Input.SEND_EOF)  # (FIN_QUEUED: no more data; nothing else changes)
            return
        ch.send(Input.RESET_SENT)
        self._control.append(encode_record(wire.Reset(channel_id, code, text)))
        self._forget(ch)

    def acknowledge(self, channel_id: int, size: int) -> None:
        """The application consumed ``size`` received bytes; may queue a WINDOW.

        A no-op for a channel that is already gone: its data may be read after
        ChannelClosed.
        """
        ch = self._channels.get(channel_id)
        if ch is not None and ch.receive_state is _RECEIVE_OPEN:
            # Fast path, once per chunk: the credit is still batched (no WINDOW
            # due).  Inlines Channel.acknowledge and ReceiveWindow.acknowledge
            # with the same bounds check (0 < size <= unacknowledged).
            window = ch.window
            pending = window.pending + size
            if 0 < size <= window.unacknowledged and pending < window.threshold:
                window.unacknowledged -= size
                window.pending = pending
                return
        if ch is None:
            self._check_gone(channel_id)
            return
        if not size:
            return
        window = ch.window
        if len(self._channels) == 1:
            room = min(self.max_window - window.size, self._growth_budget - self.window_growth)
        else:  # in company: up to, or back to, the initial window (flow.py)
            room = min(self.initial_window - window.size,
                       self._growth_budget - self.window_growth)
        before = window.size
        if ch.receive_state is _RECEIVE_OPEN:  # Channel.acknowledge's own first branch
            increment = window.acknowledge(size, room)
        else:
            increment = ch.acknowledge(size, room)
        self.window_growth += window.size - before
        if increment:  # 1 <= increment <= window <= MAX_WINDOW: no need to re-check
            self._control.append(_pack_window(_WINDOW, channel_id, increment))

    def go_away(self, code: int = 0, text: str = "") -> None:
        """Announce that no new channels will be accepted; existing ones finish."""
        if self._goaway_sent:
            return
        self._goaway_sent = True
        self._control.append(encode_record(wire.GoAway(self._table.last_remote_id, code, text)))
