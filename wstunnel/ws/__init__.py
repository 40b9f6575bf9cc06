"""RFC 6455 WebSocket, sans-IO: framing, the HTTP/1.1 upgrade handshake, connections."""

from __future__ import annotations

from .connection import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ConnectionState,
    Role,
    WebSocketConnection,
    is_valid_close_code,
)
from .events import (
    BytesMessage,
    CloseReceived,
    ConnectionClosed,
    Event,
    PingReceived,
    PongReceived,
    TextMessage,
)
from .frames import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_CONTROL_PAYLOAD,
    CloseCode,
    Frame,
    FrameDecoder,
    Opcode,
    encode_frame,
    encode_frame_parts,
    encode_masked_frame,
    mask,
)
from .handshake import (
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_HEADERS,
    SUBPROTOCOL,
    ClientHandshake,
    HandshakeAccepted,
    HandshakeFailed,
    HandshakeRejected,
    RequestReceived,
    ServerHandshake,
    accept_key,
)

__all__ = [
    "ClientHandshake",
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_HEADERS",
    "HandshakeAccepted",
    "HandshakeFailed",
    "HandshakeRejected",
    "RequestReceived",
    "SUBPROTOCOL",
    "ServerHandshake",
    "accept_key",
    "BytesMessage",
    "CloseCode",
    "CloseReceived",
    "ConnectionClosed",
    "ConnectionState",
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Event",
    "Frame",
    "FrameDecoder",
    "MAX_CONTROL_PAYLOAD",
    "Opcode",
    "PingReceived",
    "PongReceived",
    "Role",
    "TextMessage",
    "WebSocketConnection",
    "encode_frame",
    "encode_frame_parts",
    "encode_masked_frame",
    "is_valid_close_code",
    "mask",
]
