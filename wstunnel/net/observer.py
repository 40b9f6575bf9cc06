"""What a session reports about its channels, to whoever counts them.

The net layer owns this interface and never imports the code that implements
it (``service.metrics.TunnelStats``): reports go up through it, so nothing
below the service layer depends on the service layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .channel_stream import ChannelStream

__all__ = ["SessionObserver"]


class SessionObserver(Protocol):
    """Told by ``TunnelTransport`` as its channels come and go. Called in the
    transport's tasks, between two checkpoints: must not block or raise."""

    def channel_opened(self, channel: ChannelStream) -> None:
        """A channel joined the session (opened by us or admitted from the peer)."""

    def channel_closed(self, channel: ChannelStream) -> None:
        """A channel left the session: finished, refused, reset, or the session ended
        (its byte counts are final)."""

    def channel_reset(self, channel: ChannelStream, code: int, text: str) -> None:
        """We sent RESET on a channel (``mux.ResetCode``): its local socket was reset, or
        we gave up on it. Only what a peer cannot tell us: its RESETs break the channel
        with ``ChannelReset``."""

    def channel_carried(self, channel: ChannelStream, sock: object) -> None:
        """``sock`` carries ``channel`` on this side (the local client, or the socket
        dialled for it): the access log names its other end."""

    def open_failed(self, reason: int) -> None:
        """The peer refused a channel we opened (``mux.OpenFailure`` code, or an
        unknown one)."""

    def peer_open_refused(self, session: object, reason: int) -> None:
        """``session``'s multiplexer refused a peer's OPEN by itself (after GOAWAY,
        past its channel limit): the application never saw that channel."""
