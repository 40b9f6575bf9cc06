"""Events a mux Session reports: past-tense facts, drained by ``events_received()``.

Every channel the application learned about (one it opened, or one announced
by :class:`ChannelOpenRequested`) ends with exactly one :class:`ChannelClosed`,
after which its id may be forgotten -- unless the session fails first
(:class:`SessionFailed` ends every channel at once).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    "Event",
]


@dataclass(frozen=True, slots=True)
class SettingsReceived:
    """The peer's SETTINGS arrived (always its first record)."""

    version: int
    initial_window: int
    max_chunk_size: int


@dataclass(frozen=True, slots=True)
class ChannelOpenRequested:
    """The peer opened a channel: answer with accept_channel or refuse_channel."""

    channel_id: int
    kind: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    """The peer accepted a channel we opened (OPEN_OK)."""

    channel_id: int


@dataclass(frozen=True, slots=True)
class ChannelOpenFailed:
    """The peer refused a channel we opened; ``reason`` is an OpenFailure value."""

    channel_id: int
    reason: int
    text: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes for the application; call acknowledge(channel_id, len(data)) once consumed.

    ``data`` is ``bytes`` or, for large payloads, a read-only ``memoryview``
    of the received record (no copy); ``bytes(data)`` if you need bytes.
    """

    channel_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer will send no more data on this channel (FIN)."""

    channel_id: int


@dataclass(frozen=True, slots=True)
class ChannelReset:
    """The peer aborted the channel; ``code`` is a ResetCode value."""

    channel_id: int
    code: int
    text: str


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The channel may queue more: credit arrived, or room in the session's outbound
    budget (or under ``max_send_window``) came back.  ``send_capacity`` is what the
    channel's credit allows; Session.send_capacity says what send_data may queue now."""

    channel_id: int
    send_capacity: int


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """Both halves are done, or the channel was reset or refused: forget the id."""

    channel_id: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer accepts no new channels; ours above ``last_channel_id`` will be refused."""

    code: int
    text: str
    last_channel_id: int


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The peer broke the protocol; a GOAWAY is queued and the session is terminal."""

    code: int
    text: str


@dataclass(frozen=True, slots=True)
class OutboundBudgetExhausted:
    """What the session's queues hold reached ``max_queued_size``: send_capacity
    says 0 to channels that still have credit until the peer has taken about
    half of it (they get WindowUpdated then).  Once per such episode: the peer
    reads slower than the channels' sources send, or not at all."""

    held_size: int
    max_queued_size: int


_new = object.__new__
# DataReceived and WindowUpdated are built once per record on the hot path,
# filling the slots through their descriptors: about twice as fast as the
# frozen dataclass __init__ (object.__setattr__ per field), same result.
_set_channel_id = DataReceived.__dict__["channel_id"].__set__
_set_data = DataReceived.__dict__["data"].__set__


_set_window_channel_id = WindowUpdated.__dict__["channel_id"].__set__
_set_send_capacity = WindowUpdated.__dict__["send_capacity"].__set__


def new_window_updated(channel_id: int, send_capacity: int) -> WindowUpdated:
    """Build a WindowUpdated without the frozen ``__init__`` (one per WINDOW record)."""
    event = _new(WindowUpdated)
    _set_window_channel_id(event, channel_id)
    _set_send_capacity(event, send_capacity)
    return event


Event = (SettingsReceived | ChannelOpenRequested | ChannelOpened | ChannelOpenFailed
         | DataReceived | EndOfStream | ChannelReset | WindowUpdated | ChannelClosed
         | GoAwayReceived | SessionFailed | OutboundBudgetExhausted)
