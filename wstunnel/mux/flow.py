"""Credit-based flow control for one direction of one channel.

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
"""

from __future__ import annotations

from ..errors import FlowControlError, LocalProtocolError
from .wire import MAX_WINDOW, ErrorCode

__all__ = ["SendCredit", "ReceiveWindow"]


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
