"""Credit-based flow control: one direction of one channel, and a session's
receive budget over all of its channels.

Two small pure classes, one per end of a direction:

* :class:`SendCredit` -- what the peer has allowed us to send.  ``credit`` never
  goes negative (sending past it is *our* bug) and never exceeds MAX_WINDOW (a
  WINDOW that would push it past is the *peer's* bug).  A WINDOW may return
  more than we sent: the receiver grows its window (auto-tuning), and
  ``limit``, the peer's window as far as we know, follows the largest credit.
* :class:`ReceiveWindow` -- what we granted the peer.  The invariant
  ``available + unacknowledged + pending == size`` holds after every update:
  bytes are *available* to the peer, or received and not yet consumed by the
  application (*unacknowledged*), or consumed but not yet returned in a WINDOW
  record (*pending*).  Returning credit in batches of at least ``threshold``
  bytes keeps WINDOW records rare without ever stalling the sender: while the
  application keeps up the peer still holds ``size - threshold`` of credit.

A session's receive budget (:func:`plan_windows`)
-------------------------------------------------
Only ``acknowledge`` returns credit, so received-but-unacknowledged bytes
never exceed the sum of the live channels' windows.  Each channel is granted
``open_window`` at OPEN (the window our SETTINGS announce); the rest of a
window is credit the session adds with WINDOW records, from a session-wide
pool.  Two regimes:

* ``max_buffered_size`` covers ``max_channels x initial_window``: the open
  window is ``initial_window`` and the pool (for auto-tuning) is
  ``max_buffered_size // 8``; bound: live channels x initial_window +
  max_buffered_size / 8.
* It does not (10,000 channels of 256 KiB would be 2.5 GiB): the open window
  is DEFAULT_OPEN_WINDOW (16 KiB), the channel limit is at most 3/4 of
  max_buffered_size // open_window, and the pool is what the floor of every
  possible channel leaves: max_buffered_size - limit x open_window.  A channel
  we accept (OPEN_OK) or whose OPEN the peer accepted gets one WINDOW of
  ``initial_window - open_window`` from the pool, while the pool has it;
  later channels start small and grow from the pool when they are busy (auto-
  tuning, as below).  Bound: max_buffered_size, whatever the peer does.  A
  peer that opens channels and does not read costs the pool nothing beyond
  what it was granted; an idle channel holds its grant until it ends.

Windows auto-tune (:meth:`ReceiveWindow.acknowledge`, with the room
:class:`WindowBudget`'s rule gives it): a busy channel whose window is what
limits it doubles it, up to ``max_window`` (alone) or ``initial_window`` (in
company), while the pool has room.  Once another channel is live, windows
grown beyond ``initial_window`` shrink back to it (consumed credit is kept
back).  Why: all channels share one TCP connection, and what a big window lets
into flight queues in kernel buffers ahead of the other channels' bytes, where
the scheduler cannot reorder it (measured: 64-byte round trips under a bulk
upload doubled).  :class:`WindowBudget` keeps the session's account: what its
live windows together have grown beyond ``open_window``, top-ups included.
"""

from __future__ import annotations

from typing import Final

from ..errors import FlowControlError, LocalProtocolError
from ..slotted import Slotted
from .wire import MAX_WINDOW, MIN_WINDOW, ErrorCode

__all__ = ["SendCredit", "ReceiveWindow", "WindowPlan", "plan_windows", "WindowBudget",
           "DEFAULT_OPEN_WINDOW", "DEFAULT_MAX_AUTO_WINDOW"]

#: The window every channel gets at OPEN when ``max_buffered_size`` cannot
#: cover ``initial_window`` for every channel: the smallest SETTINGS value a
#: peer accepts, enough for a request, a TLS handshake flight, a prompt.
DEFAULT_OPEN_WINDOW: Final = MIN_WINDOW
#: Ceiling of an auto-tuned receive window: the bandwidth-delay product of
#: 1 Gbit/s at 30 ms round trip.
DEFAULT_MAX_AUTO_WINDOW: Final = 4 * 1024 * 1024


class SendCredit:
    """Our remaining credit towards the peer on one channel."""

    __slots__ = ("credit", "limit")

    def __init__(self, window: int) -> None:
        if window <= 0:
            raise LocalProtocolError(f"window must be positive, got {window}")
        self.credit = window
        self.limit = window

    def consume(self, size: int) -> None:
        """Spend ``size`` bytes of credit for a DATA chunk we are sending.

        Raises:
            LocalProtocolError: ``size`` is negative or exceeds the credit.
        """
        if not 0 <= size <= self.credit:
            raise LocalProtocolError(f"cannot send {size} bytes with {self.credit} of credit")
        self.credit -= size

    def grant(self, increment: int) -> None:
        """Add credit from a peer WINDOW record.

        An increment beyond the bytes we sent grows the window (the peer's
        auto-tuning); ``limit`` follows it.

        Raises:
            FlowControlError: the increment is not positive or would lift the
                credit above MAX_WINDOW.
        """
        credit = self.credit + increment
        if increment <= 0 or credit > MAX_WINDOW:
            raise FlowControlError(
                f"WINDOW of {increment} on top of {self.credit} exceeds {MAX_WINDOW}",
                code=int(ErrorCode.FLOW_CONTROL_ERROR))
        self.credit = credit
        if credit > self.limit:
            self.limit = credit

    def resize(self, limit: int) -> int:
        """Raise the window to ``limit`` (the peer's SETTINGS beat our assumption).

        Returns:
            The credit added.

        Raises:
            LocalProtocolError: ``limit`` is smaller than the current window; the
                protocol never shrinks a window.
        """
        delta = limit - self.limit
        if delta < 0:
            raise LocalProtocolError(f"cannot shrink window from {self.limit} to {limit}")
        self.limit = limit
        self.credit += delta
        return delta


class ReceiveWindow:
    """The window we granted the peer on one channel, and the credit to return."""

    __slots__ = ("size", "available", "unacknowledged", "pending", "threshold", "_scaled")

    def __init__(self, size: int, threshold: int | None = None) -> None:
        if size <= 0:
            raise LocalProtocolError(f"window must be positive, got {size}")
        self.size = size
        self.available = size
        self.unacknowledged = 0
        self.pending = 0
        self._scaled = threshold is None  # the threshold follows the size as it grows
        self.threshold = max(1, size // 4) if threshold is None else threshold
        if not 1 <= self.threshold <= size:
            raise LocalProtocolError(f"threshold {self.threshold} out of range 1-{size}")

    def receive(self, size: int) -> None:
        """Account a DATA payload of ``size`` bytes from the peer.

        Raises:
            FlowControlError: the peer sent past the window it was granted.
        """
        if size > self.available:
            raise FlowControlError(
                f"peer sent {size} bytes with only {self.available} of credit",
                code=int(ErrorCode.FLOW_CONTROL_ERROR))
        self.available -= size
        self.unacknowledged += size

    def enlarge(self, extra: int) -> None:
        """Grant ``extra`` bytes beyond the window (the caller sends them in a
        WINDOW record): a channel opened small is brought up to full size."""
        if extra <= 0 or self.size + extra > MAX_WINDOW:
            raise LocalProtocolError(f"cannot enlarge a window of {self.size} by {extra}")
        self.size += extra
        self.available += extra
        if self._scaled:
            self.threshold = max(1, self.size // 4)

    def acknowledge(self, size: int, room: int = 0) -> int:
        """The application consumed ``size`` bytes.

        Auto-tuning: when a batch of credit is due while the peer holds less
        than a quarter of the window and the application has read nearly
        everything, the window, not the reader, is what limits the channel
        (its bandwidth-delay product is larger).  The window then doubles, by
        at most ``room`` bytes, and the growth rides in the same WINDOW.

        Args:
            size: bytes consumed.
            room: how many bytes the window may grow by now (0: never);
                negative: shrink by that much, by keeping back consumed
                credit instead of returning it (never below what is in use).

        Returns:
            The increment to send in a WINDOW record now, or 0 to keep batching.

        Raises:
            LocalProtocolError: more bytes acknowledged than were received.
        """
        if not 0 <= size <= self.unacknowledged:
            raise LocalProtocolError(
                f"acknowledged {size} bytes but only {self.unacknowledged} are unacknowledged")
        self.unacknowledged -= size
        pending = self.pending + size
        threshold = self.threshold
        if pending < threshold:
            self.pending = pending
            return 0
        self.pending = 0
        if room > 0 and self.available < threshold and self.unacknowledged < threshold:
            growth = min(room, self.size)
            self.size += growth
            pending += growth
        elif room < 0:  # shrink back by withholding consumed credit
            cut = min(-room, pending)
            self.size -= cut
            pending -= cut
        if self._scaled:
            self.threshold = max(1, self.size // 4)
        self.available += pending
        return pending


class WindowPlan(Slotted):
    """How a session's receive budget is spent (module docstring)."""

    __slots__ = ("open_window", "max_channels", "pool", "max_buffered_size")

    def __init__(
        self, open_window: int, max_channels: int, pool: int, max_buffered_size: int
    ) -> None:
        #: What our SETTINGS announce: every channel's window at OPEN.
        self.open_window: Final = open_window
        #: Live channels the budget allows (at most the max_channels asked for).
        self.max_channels: Final = max_channels
        #: What windows together may grow beyond open_window (top-ups, auto-tuning).
        self.pool: Final = pool
        #: The bound on received-but-unacknowledged bytes.
        self.max_buffered_size: Final = max_buffered_size


def plan_windows(max_channels: int, initial_window: int,
                 max_buffered_size: int | None) -> WindowPlan:
    """Windows open at ``initial_window`` while ``max_buffered_size`` covers it for
    every one of ``max_channels`` channels (the pool is then an eighth of the
    budget, for auto-tuning); otherwise at DEFAULT_OPEN_WINDOW, with at most 3/4
    of the budget for those floors, so that busy channels always have a pool."""
    covered = max_channels * initial_window
    if max_buffered_size is None or covered <= max_buffered_size:
        budget = covered if max_buffered_size is None else min(covered, max_buffered_size)
        return WindowPlan(initial_window, budget // initial_window, budget // 8, budget)
    open_window = min(initial_window, DEFAULT_OPEN_WINDOW)
    if open_window == initial_window:  # a small initial_window: nothing to top up
        limit = max_buffered_size // open_window
        return WindowPlan(open_window, limit, max_buffered_size // 8, limit * open_window)
    limit = max(1, min(max_channels, max_buffered_size * 3 // 4 // open_window))
    return WindowPlan(open_window, limit, max_buffered_size - limit * open_window,
                      max_buffered_size)


class WindowBudget:
    """What a session's live receive windows have grown beyond ``open_window``,
    against the plan's pool (module docstring): top-ups, auto-tuning, and the
    shrinking back once a channel has company.

    When a WINDOW is due, a window may change by ``min(ceiling - size, pool -
    growth)`` (:meth:`ReceiveWindow.acknowledge`'s ``room``; negative: it shrinks
    back), the ceiling being ``max_window`` for a channel alone and
    ``initial_window`` in company, and ``growth`` follows its size.
    ``Session.acknowledge`` applies that rule inline: once per WINDOW, a call
    would cost more than the rule.  So ``growth`` never exceeds ``pool``.
    """

    __slots__ = ("open_window", "initial_window", "pool", "growth")

    def __init__(self, plan: WindowPlan, initial_window: int) -> None:
        self.open_window: Final = plan.open_window
        self.initial_window: Final = initial_window
        self.pool: Final = plan.pool
        #: Bytes all live windows together have grown beyond open_window.
        self.growth = 0

    def top_up(self, window: ReceiveWindow) -> int:
        """A channel just opened at ``open_window``: enlarge it to ``initial_window``
        while the pool has the difference. Returns the WINDOW increment to send (0:
        none)."""
        extra = self.initial_window - self.open_window
        if extra and self.growth + extra <= self.pool:
            self.growth += extra
            window.enlarge(extra)
            return extra
        return 0

    def release(self, window: ReceiveWindow) -> None:
        """The window's channel is gone: its growth goes back to the pool."""
        self.growth -= window.size - self.open_window

    def clear(self) -> None:
        """Every channel is gone at once (the session failed)."""
        self.growth = 0
