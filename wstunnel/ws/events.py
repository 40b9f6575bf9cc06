"""Events a ``WebSocketConnection`` reports: past-tense facts, read-only and slotted."""

from __future__ import annotations

from typing import Final, TypeAlias

from ..slotted import Slotted

__all__ = [
    "BytesMessage",
    "TextMessage",
    "PingReceived",
    "PongReceived",
    "CloseReceived",
    "ConnectionClosed",
    "Event",
]


class BytesMessage(Slotted):
    """A complete binary message (fragments already reassembled).

    ``data`` may be a ``bytearray`` (see ``Frame``); treat it as read-only.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data: Final = data


class TextMessage(Slotted):
    """A complete text message, already validated and decoded as UTF-8."""

    __slots__ = ("data",)

    def __init__(self, data: str) -> None:
        self.data: Final = data


class PingReceived(Slotted):
    """The peer pinged; the pong is already queued (unless we are closing)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload: Final = payload


class PongReceived(Slotted):
    """The peer sent a pong (solicited or not)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload: Final = payload


class CloseReceived(Slotted):
    """The peer sent a valid close frame; our reply, if one is due, is queued.

    ``code`` is 1005 (NO_STATUS_RCVD) when the frame carried no payload.
    """

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code: Final = code
        self.reason: Final = reason


class ConnectionClosed(Slotted):
    """Terminal: the WebSocket is over.  Emitted exactly once.

    ``code`` is the peer's close code after a close handshake, our close code
    after a protocol error (``reason`` then says what was wrong), or 1006 when
    the transport ended without a close frame.
    """

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code: Final = code
        self.reason: Final = reason


Event: TypeAlias = (
    BytesMessage | TextMessage | PingReceived | PongReceived | CloseReceived | ConnectionClosed
)
