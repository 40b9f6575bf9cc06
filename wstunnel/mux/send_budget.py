"""The outbound budget: what a session queues for a peer, whatever the peer grants.

Theory of operation
-------------------
The peer's windows bound what we send, not what we hold: a peer may grant
MAX_WINDOW per channel and then not read.  So the session bounds it itself: a
channel queues at most ``max_send_window`` of its credit, and all queues
together hold at most ``max_queued_size`` (``held_size``: queued bytes, plus
PIECE_OVERHEAD_SIZE per piece and what a cut piece still pins, see Channel).
``Session.send_capacity`` says so (it does the arithmetic inline, since it runs
once per chunk) and hands the channels it tells to wait to :class:`SendBudget`,
which remembers them; a cut that makes room emits WindowUpdated for them (the
I/O layer then reads from its sources again).

The last sixteenth of the budget (``reserve``) is a lane for channels with
nothing queued, one LANE_CHUNK at a time: busy channels stop short of it. A
session at its budget because many channels are busy (each woken by credit
takes the room a cut frees before a waiter sees it) would otherwise hold a
keystroke or a datagram until the busy ones stop.

Room for the budget's waiters means below half the budget: each wake-up then
has half the budget to fill, and a read-wake-read cycle per chunk on a session
at its budget is avoided; the queue never runs dry meanwhile.  A channel held
back by the cap wakes when its queue is below half the cap.  Every episode at
the budget emits one OutboundBudgetExhausted.

The two counters every cut reads stay on the Outbox (scheduler.py):
``held_size``, and ``watching``, the number of reasons to call
:meth:`SendBudget.on_room` after a cut (channels held back by the cap, plus 1
while any wait for the budget); with no one waiting a cut costs one test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from .channel import Channel, SendState
from .events import Event, OutboundBudgetExhausted, WindowUpdated
from .flow import DEFAULT_MAX_AUTO_WINDOW
from .scheduler import Outbox

__all__ = ["SendBudget", "DEFAULT_MAX_SEND_WINDOW", "DEFAULT_MAX_QUEUED_SIZE", "LANE_CHUNK",
           "reserve"]

#: The most one channel queues, whatever window the peer grants: a peer of
#: ours grows a window to DEFAULT_MAX_AUTO_WINDOW at most, so it is never cut.
DEFAULT_MAX_SEND_WINDOW: Final = DEFAULT_MAX_AUTO_WINDOW
#: What all channels of a session together queue for the peer: four times
#: the largest window a peer of ours grants one channel, so a bulk channel
#: never waits for it; 64 channels' worth at the default window.
DEFAULT_MAX_QUEUED_SIZE: Final = 16 * 1024 * 1024
#: A channel with nothing queued (a keystroke, a datagram, a request) may take
#: this much at a time from the last sixteenth of the budget, which channels with
#: a queue of their own do not use (``reserve``): so a session at its budget,
#: filled by many busy channels, still passes interactive bytes at once.
LANE_CHUNK: Final = 16 * 1024
_SEND_OPEN: Final = SendState.OPEN


def reserve(max_queued_size: int) -> int:
    """The part of the budget kept for channels with nothing queued (LANE_CHUNK)."""
    return max_queued_size // 16


class SendBudget:
    """Whom the session told to wait for room, and their wake-ups (module docstring).

    Owned by one Session, which shares its channel dict and Outbox with it and
    takes its events through ``emit``.
    """

    __slots__ = ("max_send_window", "max_queued_size", "wake_below", "waiters", "exhaustions",
                 "outbox", "_channels", "_emit")

    def __init__(self, channels: dict[int, Channel], emit: Callable[[Event], None], *,
                 max_send_window: int, max_queued_size: int) -> None:
        self.max_send_window = max_send_window
        self.max_queued_size = max_queued_size
        #: The budget's wake-up mark (0: nobody waits for it) and its waiters in
        #: order (an ordered set).
        self.wake_below = 0
        self.waiters: dict[int, None] = {}
        #: OutboundBudgetExhausted episodes so far.
        self.exhaustions = 0
        #: Set by the session once it has built its Outbox (which calls on_room).
        self.outbox: Outbox
        self._channels = channels
        self._emit = emit

    def capacity(self, ch: Channel) -> int:
        """``Session.send_capacity`` before the budget: what WindowUpdated reports."""
        if ch.send_state is not _SEND_OPEN:
            return 0
        credit = ch.credit.credit
        cap = self.max_send_window
        return (credit if credit < cap else cap) - ch.queued_size

    def hold_at_cap(self, ch: Channel) -> None:
        """The cap holds ``ch`` back while it has credit: wake it at half the cap."""
        ch.wake_below = self.max_send_window // 2 + 1
        self.outbox.watching += 1

    def wait(self, channel_id: int) -> None:
        """The budget holds the channel back: wake it once there is room."""
        if not self.waiters:  # a new episode
            outbox = self.outbox
            outbox.watching += 1
            self.wake_below = self.max_queued_size // 2
            self.exhaustions += 1
            self._emit(OutboundBudgetExhausted(outbox.held_size, self.max_queued_size))
        self.waiters[channel_id] = None

    def on_room(self, ch: Channel) -> None:
        """A cut while channels wait for room (Outbox's on_room): wake those it is for."""
        if ch.queued_size < ch.wake_below:
            ch.wake_below = 0
            self.outbox.watching -= 1
            if ch.send_state is _SEND_OPEN:
                self._emit(WindowUpdated(ch.channel_id, self.capacity(ch)))
        if self.waiters and self.outbox.held_size < self.wake_below:
            self._wake_waiters()

    def release(self, ch: Channel) -> None:
        """``ch`` ended (already gone from the channels): its queue is freed."""
        outbox = self.outbox
        if ch.wake_below:
            outbox.watching -= 1
        if ch.queued_size or ch.early:
            outbox.held_size -= ch.held_size
            ch.discard_queue()
            if self.waiters and outbox.held_size < self.wake_below:
                self._wake_waiters()

    def release_early(self, ch: Channel) -> None:
        """The peer answered ``ch``'s OPEN: the DATA kept since is freed (Channel.keep)."""
        if ch.early is None:
            return
        outbox = self.outbox
        outbox.held_size -= ch.drop_early()
        if self.waiters and outbox.held_size < self.wake_below:
            self._wake_waiters()

    def clear(self) -> None:
        """Forget the waiters (the session failed; Outbox.clear resets the counters)."""
        self.wake_below = 0
        self.waiters.clear()

    def _wake_waiters(self) -> None:
        self.outbox.watching -= 1
        self.wake_below = 0
        waiters, self.waiters = self.waiters, {}
        for channel_id in waiters:
            ch = self._channels.get(channel_id)
            if ch is not None and ch.send_state is _SEND_OPEN:
                self._emit(WindowUpdated(channel_id, self.capacity(ch)))
