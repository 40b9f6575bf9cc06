"""Events a ``WebSocketConnection`` reports: past-tense facts, frozen and slotted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "BytesMessage",
    "TextMessage",
    "PingReceived",
    "PongReceived",
    "CloseReceived",
    "ConnectionClosed",
    "Event",
]


@dataclass(frozen=True, slots=True)
class BytesMessage:
    """A complete binary message (fragments already reassembled).

    ``data`` may be a ``bytearray`` (see ``Frame``); treat it as read-only.
    """

    data: bytes | bytearray


@dataclass(frozen=True, slots=True)
class TextMessage:
    """A complete text message, already validated and decoded as UTF-8."""

    data: str


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the pong is already queued (unless we are closing)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The peer sent a pong (solicited or not)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer sent a valid close frame; our reply, if one is due, is queued.

    ``code`` is 1005 (NO_STATUS_RCVD) when the frame carried no payload.
    """

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Terminal: the WebSocket is over.  Emitted exactly once.

    ``code`` is the peer's close code after a close handshake, our close code
    after a protocol error (``reason`` then says what was wrong), or 1006 when
    the transport ended without a close frame.
    """

    code: int
    reason: str


Event: TypeAlias = (
    BytesMessage | TextMessage | PingReceived | PongReceived | CloseReceived | ConnectionClosed
)
