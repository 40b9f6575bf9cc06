"""Credit-based flow control for one direction of one channel.

Two small pure classes, one per end of a direction:

* :class:`SendCredit` -- what the peer has allowed us to send.  ``credit`` never
  goes negative (sending past it is *our* bug) and never exceeds ``limit``, the
  peer's window (a WINDOW that would push it past is the *peer's* bug: it
  returned credit for bytes it never received).
* :class:`ReceiveWindow` -- what we granted the peer.  The invariant
  ``available + unacknowledged + pending == size`` holds after every update:
  bytes are *available* to the peer, or received and not yet consumed by the
  application (*unacknowledged*), or consumed but not yet returned in a WINDOW
  record (*pending*).  Returning credit in batches of at least ``threshold``
  bytes keeps WINDOW records rare without ever stalling the sender: while the
  application keeps up the peer still holds ``size - threshold`` of credit.
"""

from __future__ import annotations

from wstunnel.errors import FlowControlError, LocalProtocolError

from .wire import ErrorCode

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

        Raises:
            FlowControlError: the increment is not positive or would exceed the
                peer's window (it returned bytes it was never sent).
        """
        if increment <= 0 or self.credit + increment > self.limit:
            raise FlowControlError(
                f"WINDOW of {increment} on top of {self.credit} exceeds window {self.limit}",
                code=int(ErrorCode.FLOW_CONTROL_ERROR))
        self.credit += increment

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

    __slots__ = ("size", "available", "unacknowledged", "pending", "threshold")

    def __init__(self, size: int, threshold: int | None = None) -> None:
        if size <= 0:
            raise LocalProtocolError(f"window must be positive, got {size}")
        self.size = size
        self.available = size
        self.unacknowledged = 0
        self.pending = 0
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

    def acknowledge(self, size: int) -> int:
        """The application consumed ``size`` bytes.

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
        if pending < self.threshold:
            self.pending = pending
            return 0
        self.pending = 0
        self.available += pending
        return pending
