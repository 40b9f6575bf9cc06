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
    encode_binary_parts,
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

# The uninitialised receive buffer lives beside the C masking code that provides
# it; net/ reads sockets into it too, through this public name.
from .masking import new_buffer

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
    "encode_binary_parts",
    "is_valid_close_code",
    "mask",
    "new_buffer",
]
