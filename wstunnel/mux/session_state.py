"""What one multiplexer session holds and reports, and how a channel leaves it.

Theory of operation
-------------------
A :class:`~.session.Session` is three classes, each the base of the next, one
concern each:

* :class:`SessionState` (here): the constructor and its limits, the state the
  other two read, what the session reports, and a channel's end (``_forget``,
  the one place a channel leaves the table; ``_queue_fin``, the FIN, or the
  held-back RESET, once its data is out);
* :class:`~.control.SessionControl` (control.py): the control records both
  ways -- SETTINGS, OPEN and its answers, FIN, RESET, GOAWAY -- and failure;
* :class:`~.session.Session` (session.py): the data path, DATA and WINDOW both
  ways, once per record, and the output.

Why base classes and not objects of their own: the per-record paths read a
few attributes of this state per record, each one lookup on the instance; a
helper object in between would add a lookup per record.  They share the
instance, so the seams are by concern, not by ownership.
"""

from __future__ import annotations

import enum
from typing import Final

from ..errors import LocalProtocolError, RemoteProtocolError, SessionClosed
from . import wire
from .channel import Channel, ChannelTable, Input
from .events import ChannelClosed, Event
from .flow import DEFAULT_MAX_AUTO_WINDOW, WindowBudget, plan_windows
from .scheduler import Outbox
from .send_budget import DEFAULT_MAX_QUEUED_SIZE, DEFAULT_MAX_SEND_WINDOW, SendBudget, reserve
from .wire import (
    DATA_HEADER_SIZE,
    DEFAULT_INITIAL_WINDOW,
    DEFAULT_MAX_CHUNK_SIZE,
    OpenFailure,
    encode_record,
)

__all__ = ["Role", "SessionState", "DEFAULT_MAX_CHANNELS"]

#: Live channels per session: 10,000 channels and room to spare.  What bounds
#: their memory is ``max_buffered_size`` (flow.py, plan_windows), not this.
DEFAULT_MAX_CHANNELS: Final = 10240


class Role(enum.Enum):
    AGENT = "agent"  # opens odd channel ids
    RELAY = "relay"  # opens even channel ids


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise LocalProtocolError(f"{name} must be in {low}-{high}, got {value}")


class SessionState:
    """The state of one session and its reports (module docstring)."""

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
        if max_window is None:
            max_window = max(initial_window, DEFAULT_MAX_AUTO_WINDOW)
        _check_range("max_window", max_window, initial_window, wire.MAX_WINDOW)
        self.max_window = max_window
        self._windows = WindowBudget(plan, initial_window)
        if quantum is not None:
            _check_range("quantum", quantum, 1, 1 << 30)
        self._set_up(role, quantum, solo_chunk_size)

    def _set_up(self, role: Role, quantum: int | None, solo_chunk_size: int) -> None:
        """The channel table, the outbox and budget, and our SETTINGS queued first."""
        self.failure: RemoteProtocolError | None = None
        self.peer_settings: wire.Settings | None = None
        self._table = ChannelTable(opens_odd=role is Role.AGENT)
        self._channels = self._table.live
        self._events: list[Event] = []
        chunk_size = wire.MIN_CHUNK_SIZE  # what the peer surely accepts until its SETTINGS
        self._fixed_quantum = quantum is not None
        #: What busy channels may fill: the budget less the lane (send_budget.py reserve)
        self._busy_limit = self.max_queued_size - reserve(self.max_queued_size)
        self._budget = budget = SendBudget(self._channels, self._emit,
                                           max_send_window=self.max_send_window,
                                           max_queued_size=self.max_queued_size)
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

    # -- what the session reports ------------------------------------------------

    @property
    def buffered_size(self) -> int:
        """Received bytes the application has not acknowledged (live channels)."""
        return sum(ch.window.unacknowledged for ch in self._channels.values())

    @property
    def queued_size(self) -> int:
        """Bytes given to :meth:`send_data` and not yet cut into records."""
        return sum(ch.queued_size for ch in self._channels.values())

    @property
    def window_growth(self) -> int:
        """Bytes all live receive windows together have grown beyond open_window
        (within the pool: flow.py)."""
        return self._windows.growth

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

    def _emit(self, event: Event) -> None:
        """For the SendBudget: ``_events`` is replaced, not cleared, when drained."""
        self._events.append(event)

    # -- a channel's end -----------------------------------------------------------

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
        self._windows.release(ch.window)
        self._drr.discard(ch.channel_id)
        if ch.wake_below or ch.queued_size or ch.early:
            self._budget.release(ch)
        self._events.append(ChannelClosed(ch.channel_id))

    def _queue_fin(self, ch: Channel) -> None:
        """The channel's queued data went out after send_eof (the Outbox calls this)."""
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
