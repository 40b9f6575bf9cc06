"""Events a mux Session reports: past-tense facts, drained by ``events_received()``.

Every channel the application learned about (one it opened, or one announced
by :class:`ChannelOpenRequested`) ends with exactly one :class:`ChannelClosed`,
after which its id may be forgotten -- unless the session fails first
(:class:`SessionFailed` ends every channel at once).
"""

from __future__ import annotations

from typing import Final

from ..slotted import Slotted

__all__ = [
    "SettingsReceived",
    "ChannelOpenRequested",
    "ChannelOpened",
    "ChannelOpenFailed",
    "DataReceived",
    "EndOfStream",
    "ChannelReset",
    "WindowUpdated",
    "ChannelClosed",
    "GoAwayReceived",
    "SessionFailed",
    "OutboundBudgetExhausted",
    "PeerOpenRefused",
    "Event",
]


class SettingsReceived(Slotted):
    """The peer's SETTINGS arrived (always its first record)."""

    __slots__ = ("version", "initial_window", "max_chunk_size")

    def __init__(self, version: int, initial_window: int, max_chunk_size: int) -> None:
        self.version: Final = version
        self.initial_window: Final = initial_window
        self.max_chunk_size: Final = max_chunk_size


class ChannelOpenRequested(Slotted):
    """The peer opened a channel: answer with accept_channel or refuse_channel."""

    __slots__ = ("channel_id", "kind", "host", "port")

    def __init__(self, channel_id: int, kind: int, host: str, port: int) -> None:
        self.channel_id: Final = channel_id
        self.kind: Final = kind
        self.host: Final = host
        self.port: Final = port


class ChannelOpened(Slotted):
    """The peer accepted a channel we opened (OPEN_OK)."""

    __slots__ = ("channel_id",)

    def __init__(self, channel_id: int) -> None:
        self.channel_id: Final = channel_id


class ChannelOpenFailed(Slotted):
    """The peer refused a channel we opened; ``reason`` is an OpenFailure value.

    With GOING_AWAY the peer never acted on the OPEN, so it may be made again on
    another session: ``retry_data`` is then every byte given to ``send_data`` on
    the channel (sent before the refusal or still queued), to send again there,
    and ``retry_eof`` says whether ``send_eof`` was called. For any other reason
    ``retry_data`` is None: the refusal is final.
    """

    __slots__ = ("channel_id", "reason", "text", "retry_data", "retry_eof")

    def __init__(self, channel_id: int, reason: int, text: str, *,
                 retry_data: bytes | None = None, retry_eof: bool = False) -> None:
        self.channel_id: Final = channel_id
        self.reason: Final = reason
        self.text: Final = text
        self.retry_data: Final = retry_data
        self.retry_eof: Final = retry_eof


class DataReceived(Slotted):
    """Bytes for the application; call acknowledge(channel_id, len(data)) once consumed.

    ``data`` is ``bytes`` or, for large payloads, a read-only ``memoryview``
    of the received record (no copy); ``bytes(data)`` if you need bytes.
    """

    __slots__ = ("channel_id", "data")

    def __init__(self, channel_id: int, data: bytes | memoryview) -> None:
        self.channel_id: Final = channel_id
        self.data: Final = data


class EndOfStream(Slotted):
    """The peer will send no more data on this channel (FIN)."""

    __slots__ = ("channel_id",)

    def __init__(self, channel_id: int) -> None:
        self.channel_id: Final = channel_id


class ChannelReset(Slotted):
    """The peer aborted the channel; ``code`` is a ResetCode value."""

    __slots__ = ("channel_id", "code", "text")

    def __init__(self, channel_id: int, code: int, text: str) -> None:
        self.channel_id: Final = channel_id
        self.code: Final = code
        self.text: Final = text


class WindowUpdated(Slotted):
    """The channel may queue more: credit arrived, or room in the session's outbound
    budget (or under ``max_send_window``) came back.  ``send_capacity`` is what the
    channel's credit allows; Session.send_capacity says what send_data may queue now."""

    __slots__ = ("channel_id", "send_capacity")

    def __init__(self, channel_id: int, send_capacity: int) -> None:
        self.channel_id: Final = channel_id
        self.send_capacity: Final = send_capacity


class ChannelClosed(Slotted):
    """Both halves are done, or the channel was reset or refused: forget the id."""

    __slots__ = ("channel_id",)

    def __init__(self, channel_id: int) -> None:
        self.channel_id: Final = channel_id


class GoAwayReceived(Slotted):
    """The peer accepts no new channels; ours above ``last_channel_id`` will be refused."""

    __slots__ = ("code", "text", "last_channel_id")

    def __init__(self, code: int, text: str, last_channel_id: int) -> None:
        self.code: Final = code
        self.text: Final = text
        self.last_channel_id: Final = last_channel_id


class SessionFailed(Slotted):
    """The peer broke the protocol; a GOAWAY is queued and the session is terminal."""

    __slots__ = ("code", "text")

    def __init__(self, code: int, text: str) -> None:
        self.code: Final = code
        self.text: Final = text


class OutboundBudgetExhausted(Slotted):
    """What the session's queues hold reached ``max_queued_size``: send_capacity
    says 0 to channels that still have credit until the peer has taken about
    half of it (they get WindowUpdated then).  Once per such episode: the peer
    reads slower than the channels' sources send, or not at all."""

    __slots__ = ("held_size", "max_queued_size")

    def __init__(self, held_size: int, max_queued_size: int) -> None:
        self.held_size: Final = held_size
        self.max_queued_size: Final = max_queued_size


class PeerOpenRefused(Slotted):
    """The session refused a peer's OPEN by itself and answered it (after GOAWAY,
    past its channel limit, an unknown kind): the application never hears of the
    channel. For counting and logs; ``Session.refused_opens`` has the totals."""

    __slots__ = ("channel_id", "reason")

    def __init__(self, channel_id: int, reason: int) -> None:
        self.channel_id: Final = channel_id
        self.reason: Final = reason


Event = (SettingsReceived | ChannelOpenRequested | ChannelOpened | ChannelOpenFailed
         | DataReceived | EndOfStream | ChannelReset | WindowUpdated | ChannelClosed
         | GoAwayReceived | SessionFailed | OutboundBudgetExhausted | PeerOpenRefused)
