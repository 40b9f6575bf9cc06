"""The multiplexer for one session (one WebSocket), sans-IO.

Theory of operation
-------------------
Input is whole records (one per binary WebSocket message) through
:meth:`Session.receive_record`; facts come out of :meth:`events_received`.
Output is pulled one record at a time with :meth:`next_record`, so the I/O
layer asks for bytes only when it can write them and never holds a backlog:
what waits is either a small control record or application data still queued
on its channel, and that is bounded by send credit.

The class is built in three layers (session_state.py says why): the state,
its limits and reports (:class:`SessionState`); the control records, both
ways, and failure (:class:`SessionControl`, control.py: ordering, ids and peer
violations are explained there); and here the data path, DATA and WINDOW both
ways, and the output.  The data path runs once per record: its fast paths
inline the calls they name and read attributes into locals once.

Memory, both ways.  Inbound: only ``acknowledge`` returns credit, so what
we buffer is bounded by the windows we grant; how ``max_buffered_size`` sizes
them, the pool they grow from and auto-tuning are in flow.py
(:func:`plan_windows`; :class:`WindowBudget` keeps the growth against the pool).
Outbound: we bound it, not the peer's windows: ``max_send_window`` per
channel, ``max_queued_size`` per session; :meth:`send_capacity` says so and
send_budget.py wakes whom it told to wait.
"""

from __future__ import annotations

import struct
from typing import Final

from ..errors import LocalProtocolError, RemoteProtocolError
from . import wire
from .channel import PIECE_OVERHEAD_SIZE, Action, Channel, Input, ReceiveState, SendState
from .control import SessionControl
from .events import DataReceived, Event, WindowUpdated
from .flow import DEFAULT_MAX_AUTO_WINDOW, DEFAULT_OPEN_WINDOW, WindowPlan, plan_windows
from .scheduler import Parts
from .send_budget import DEFAULT_MAX_QUEUED_SIZE, DEFAULT_MAX_SEND_WINDOW, LANE_CHUNK
from .session_state import DEFAULT_MAX_CHANNELS, Role
from .wire import DATA_HEADER_SIZE, ErrorCode, decode_record

# The window plan (flow.py), the budget defaults (send_budget.py), Role and
# DEFAULT_MAX_CHANNELS (session_state.py) are importable from here too, where
# they were once defined.
__all__ = ["Role", "Session", "DEFAULT_MAX_CHANNELS", "DEFAULT_OPEN_WINDOW", "WindowPlan",
           "plan_windows", "DEFAULT_MAX_AUTO_WINDOW", "DEFAULT_MAX_SEND_WINDOW",
           "DEFAULT_MAX_QUEUED_SIZE"]

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


class Session(SessionControl):
    """One multiplexed session; see the module docstring for the rules, and
    :meth:`SessionState.__init__` (inherited) for the limits it is built with."""

    # -- output ------------------------------------------------------------------

    def events_received(self) -> list[Event]:
        """Return and clear the events produced so far."""
        events, self._events = self._events, []
        return events

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

    # -- local actions -------------------------------------------------------------

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
        left = self._busy_limit - self._outbox.held_size - PIECE_OVERHEAD_SIZE
        if own <= left or own <= 0:
            if own <= 0 and credit > cap and not ch.wake_below:
                self._budget.hold_at_cap(ch)
            return own
        if left > 0:
            return left
        if not ch.queued_size:  # (nothing of its own waits: the lane, send_budget.py)
            lane = self.max_queued_size - self._outbox.held_size - PIECE_OVERHEAD_SIZE
            if lane > 0:
                return min(own, lane, LANE_CHUNK)
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
        if ch.receive_state is not _RECEIVE_OPEN:
            ch.acknowledge(size)  # raises while PENDING; CLOSED: credit kept, no WINDOW
            return
        # A batch is due (or size is out of bounds: ReceiveWindow raises). The
        # window may grow (or shrink) by the room WindowBudget's rule gives it,
        # applied inline: once per WINDOW, a call would cost more than the rule.
        windows = self._windows
        window = ch.window
        before = window.size
        ceiling = self.max_window if len(self._channels) == 1 else self.initial_window
        increment = window.acknowledge(size, min(ceiling - before, windows.pool - windows.growth))
        windows.growth += window.size - before
        if increment:  # 1 <= increment <= window <= MAX_WINDOW: no need to re-check
            self._control.append(_pack_window(_WINDOW, channel_id, increment))
