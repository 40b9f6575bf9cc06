"""Records framed in a plain byte stream: the carrier of the HTTP transports, sans-IO.

Theory of operation: where a WebSocket cannot pass, the session's records
travel inside ordinary HTTP request and response bodies (docs/PROTOCOL.md
§11). Those bodies are byte streams with no message boundaries, so each
record gets a 5-byte frame header: a type byte and a u32 length. Besides
records there are the three controls the session needs from its carrier:
PING (answered with a PONG carrying the same payload), PONG, and CLOSE (a
u16 code and a UTF-8 reason, echoed once, as in RFC 6455's close handshake).

``FramedConnection`` implements ``protocol.RecordCarrier`` with the same
events and states as ``ws.WebSocketConnection``, so ``TunnelProtocol`` and
everything above it run unchanged: a record arrives as ``ws.BytesMessage``,
then ``ws.PingReceived``/``PongReceived``/``CloseReceived``, and
``ws.ConnectionClosed`` exactly once, last. Peer garbage (an unknown type, a
length over the limit) never raises: it queues a CLOSE with the code, goes
terminal and keeps the error in ``failure``.

A big record's payload can be read straight into a buffer of its own
(``receive_buffer``/``buffer_filled``), as the WebSocket decoder does.

The names and headers of the HTTP transports live here too, so the agent and
the relay (peers that never import each other) share one spelling.
"""

from __future__ import annotations

import struct
from typing import Final

from . import ws
from .errors import LocalProtocolError, PayloadTooBig, RemoteProtocolError

__all__ = [
    "FramedConnection",
    "FrameType",
    "encode_frame",
    "chunked",
    "HEADER_SIZE",
    "STREAMING",
    "POLLING",
    "HTTP_TRANSPORTS",
    "TRANSPORT_HEADER",
    "SESSION_HEADER",
    "SEQUENCE_HEADER",
    "PIPELINE_HEADER",
    "DOWN_PIPELINE_HEADER",
    "CONTENT_TYPE",
    "POLL_HOLD_TIMEOUT",
]

#: How the HTTP transports are named: in config (``transport:``), in the
#: ``X-Wstunnel-Transport`` header, in logs and in status.
STREAMING: Final = "streaming"
POLLING: Final = "polling"
HTTP_TRANSPORTS: Final = (STREAMING, POLLING)
#: The marker of every HTTP-transport request (its value: one of HTTP_TRANSPORTS).
TRANSPORT_HEADER: Final = "X-Wstunnel-Transport"
#: The session id, given by the relay in its answer to the opening request.
SESSION_HEADER: Final = "X-Wstunnel-Session"
#: Polling: the number of this upstream body or of the downstream batch asked for.
SEQUENCE_HEADER: Final = "X-Wstunnel-Seq"
#: Polling: on the opening answer, how many upstream POSTs the relay takes in flight
#: at once (it holds body N + 1, unread, until body N is taken); absent: one.
PIPELINE_HEADER: Final = "X-Wstunnel-Pipeline"
#: Polling: on the opening answer, how many downstream GETs the relay takes in flight
#: at once (it holds GET N + 1 until GET N's answer has ended); absent: one.
DOWN_PIPELINE_HEADER: Final = "X-Wstunnel-Pipeline-Down"
CONTENT_TYPE: Final = "application/octet-stream"
#: Polling: how long the relay holds a GET that finds nothing to send.
POLL_HOLD_TIMEOUT: Final = 25.0

HEADER_SIZE: Final = 5
MAX_CONTROL_PAYLOAD: Final = 125
#: A payload at least this big is read into a buffer of its own (receive_buffer).
DIRECT_MIN_SIZE: Final = 64 * 1024
_HEADER: Final = struct.Struct(">BI")
_NORMAL: Final = 1000
_ABNORMAL: Final = 1006
_NO_STATUS: Final = 1005
_PROTOCOL_ERROR: Final = 1002


class FrameType:
    """The frame types (u8)."""

    RECORD: Final = 0x00
    PING: Final = 0x01
    PONG: Final = 0x02
    CLOSE: Final = 0x03


def chunked(parts: list[bytes | bytearray | memoryview]) -> list[bytes | bytearray | memoryview]:
    """``parts`` as one HTTP/1.1 chunk (RFC 9112 §7.1), the parts themselves not
    copied: a streaming body's write is one chunk, however many records it holds."""
    size = sum(map(len, parts))
    return [b"%x\r\n" % size, *parts, b"\r\n"] if size else []


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    """One whole frame (tests and the agent's probe; records go out as parts)."""
    return _HEADER.pack(frame_type, len(payload)) + payload


class FramedConnection:
    """One session's carrier over a byte stream; see the module docstring.

    Args:
        max_record_size: the largest record accepted; a longer one fails the
            connection with 1009 (as a WebSocket message over the limit does).
        trailing_data: bytes that arrived before this object existed.
    """

    def __init__(self, *, max_record_size: int = ws.DEFAULT_MAX_MESSAGE_SIZE,
                 trailing_data: bytes = b"") -> None:
        if max_record_size < 1:
            raise LocalProtocolError("max_record_size must be positive")
        self._max_record_size = max_record_size
        self._buffer = bytearray()
        self._big: bytearray | None = None  # a big payload being read in place
        self._big_filled = 0
        self._big_type = 0
        self._events: list[ws.Event] = []
        self._output: list[bytes | bytearray | memoryview] = []
        self.state = ws.ConnectionState.OPEN
        self.failure: RemoteProtocolError | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.should_close_transport = False
        if trailing_data:
            self.receive_data(trailing_data)

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Process bytes from the stream; never raises for peer misbehaviour.

        Afterwards call ``events_received()`` and ``data_to_send_parts()``.
        """
        if self.state is ws.ConnectionState.CLOSED or not data:
            return
        big = self._big
        if big is not None:
            take = min(len(big) - self._big_filled, len(data))
            big[self._big_filled:self._big_filled + take] = data[:take]
            self._big_filled += take
            data = data[take:]
            self._finish_big()
        if not data or self._closed:
            return
        if self._buffer:
            self._buffer += data
            self._decode_buffer()
            return
        view = memoryview(data)  # (whole frames straight from the read: one copy fewer)
        consumed = self._decode(view)
        if consumed < len(view) and not self._closed:
            self._buffer += view[consumed:]

    @property
    def _closed(self) -> bool:
        return self.state is ws.ConnectionState.CLOSED

    def receive_buffer(self) -> memoryview | None:
        """Where to read next instead of ``receive_data``, or None: the rest of a
        big record's payload, read in place. Release the view, then ``buffer_filled``."""
        if self.state is ws.ConnectionState.CLOSED:
            return None
        if self._big is None:
            self._start_big()
        if self._big is None:
            return None
        return memoryview(self._big)[self._big_filled:]

    def buffer_filled(self, size: int) -> None:
        """``size`` bytes were read into ``receive_buffer()``; process as ``receive_data``."""
        if self._big is None or self.state is ws.ConnectionState.CLOSED:
            return
        self._big_filled += size
        self._finish_big()
        self._decode_buffer()

    def receive_eof(self) -> None:
        """The stream ended; without a close handshake that is code 1006."""
        if self.state is not ws.ConnectionState.CLOSED:
            self._finish(_ABNORMAL, "connection lost without a close frame")

    def _start_big(self) -> None:
        """A big payload whose header is in: move what is here into its own buffer."""
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            return
        frame_type, length = _HEADER.unpack_from(buffer)
        if (frame_type != FrameType.RECORD or length < DIRECT_MIN_SIZE
                or length > self._max_record_size or len(buffer) - HEADER_SIZE >= length):
            return
        big = bytearray(length)
        have = len(buffer) - HEADER_SIZE
        big[:have] = buffer[HEADER_SIZE:]
        del buffer[:]
        self._big, self._big_filled, self._big_type = big, have, frame_type

    def _finish_big(self) -> None:
        big = self._big
        if big is not None and self._big_filled == len(big):
            self._big = None
            self._events.append(ws.BytesMessage(big))

    def _decode_buffer(self) -> None:
        buffer = self._buffer
        consumed = self._decode(buffer)
        del buffer[:consumed]  # (a failure has replaced self._buffer: harmless)

    def _decode(self, buffer: bytearray | memoryview) -> int:
        """Handle the whole frames in ``buffer``; the number of bytes they took."""
        offset = 0
        try:
            while self.state is not ws.ConnectionState.CLOSED:
                if len(buffer) - offset < HEADER_SIZE:
                    break
                frame_type, length = _HEADER.unpack_from(buffer, offset)
                self._check(frame_type, length)
                end = offset + HEADER_SIZE + length
                if end > len(buffer):
                    break
                self._handle(frame_type, bytes(buffer[offset + HEADER_SIZE:end]))
                offset = end
        except RemoteProtocolError as exc:
            self._fail(exc)
        return offset

    def _check(self, frame_type: int, length: int) -> None:
        """Reject a frame from its header alone: lengths first."""
        if frame_type == FrameType.RECORD:
            if length > self._max_record_size:
                raise PayloadTooBig(f"record of {length} bytes (limit {self._max_record_size})",
                                    1009)
            return
        if frame_type not in (FrameType.PING, FrameType.PONG, FrameType.CLOSE):
            raise RemoteProtocolError(f"unknown frame type 0x{frame_type:02x}", _PROTOCOL_ERROR)
        if length > MAX_CONTROL_PAYLOAD:
            raise RemoteProtocolError(f"control frame of {length} bytes (limit "
                                      f"{MAX_CONTROL_PAYLOAD})", _PROTOCOL_ERROR)
        if frame_type == FrameType.CLOSE and length == 1:
            raise RemoteProtocolError("close frame with a 1-byte payload", _PROTOCOL_ERROR)

    def _handle(self, frame_type: int, payload: bytes) -> None:
        if frame_type == FrameType.RECORD:
            self._events.append(ws.BytesMessage(payload))
        elif frame_type == FrameType.PING:
            self._events.append(ws.PingReceived(payload))
            if self.state is ws.ConnectionState.OPEN:
                self._queue(FrameType.PONG, payload)
        elif frame_type == FrameType.PONG:
            self._events.append(ws.PongReceived(payload))
        else:
            self._handle_close(payload)

    def _handle_close(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if payload else _NO_STATUS
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError("close reason is not valid UTF-8", 1007) from exc
        self._events.append(ws.CloseReceived(code, reason))
        if self.state is ws.ConnectionState.OPEN:
            self._queue(FrameType.CLOSE, payload[:2])
        self._finish(code, reason)

    # -- output --------------------------------------------------------------

    def events_received(self) -> list[ws.Event]:
        """Return and forget the events produced since the last call."""
        events, self._events = self._events, []
        return events

    @property
    def has_output(self) -> bool:
        return bool(self._output)

    def data_to_send(self) -> bytes | bytearray:
        """Return and forget the bytes to write, joined."""
        output, self._output = self._output, []
        return b"".join(output)

    def data_to_send_parts(self) -> list[bytes | bytearray | memoryview]:
        """``data_to_send`` as the pieces queued, not joined (a gathering write)."""
        output, self._output = self._output, []
        return output

    # -- local actions -------------------------------------------------------

    def send_binary_parts(self, prefix: bytes, payload: bytes | bytearray | memoryview) -> None:
        """Queue one record ``prefix + payload`` without joining them.

        Raises:
            LocalProtocolError: we already sent a close, or the connection is closed.
        """
        self._check_can_send()
        self._output.append(_HEADER.pack(FrameType.RECORD, len(prefix) + len(payload)) + prefix)
        if payload:
            self._output.append(payload)

    def ping(self, payload: bytes = b"") -> None:
        """Queue a ping; the answer arrives as ``PongReceived``."""
        self._check_can_send()
        self._queue(FrameType.PING, _control(payload))

    def close(self, code: int = _NORMAL, reason: str = "") -> None:
        """Start the close handshake (a no-op unless OPEN): flush output, then wait
        for the peer's CLOSE or drop the stream after a timeout of your choosing."""
        if self.state is not ws.ConnectionState.OPEN:
            return
        payload = b"" if code == _NO_STATUS else code.to_bytes(2, "big") + reason.encode()
        self._queue(FrameType.CLOSE, _control(payload))
        self.state = ws.ConnectionState.CLOSING

    def _check_can_send(self) -> None:
        if self.state is not ws.ConnectionState.OPEN:
            raise LocalProtocolError(f"cannot send: connection is {self.state.value}")

    def _queue(self, frame_type: int, payload: bytes) -> None:
        self._output.append(encode_frame(frame_type, payload))

    def _fail(self, exc: RemoteProtocolError) -> None:
        """Peer garbage: our CLOSE with the code (never the text), then terminal."""
        self.failure = exc
        if self.state is ws.ConnectionState.OPEN:
            self._queue(FrameType.CLOSE, exc.code.to_bytes(2, "big"))
        self._finish(exc.code, str(exc))

    def _finish(self, code: int, reason: str) -> None:
        self.state = ws.ConnectionState.CLOSED
        self.close_code = code
        self.close_reason = reason
        self.should_close_transport = True
        self._buffer = bytearray()
        self._big = None
        self._events.append(ws.ConnectionClosed(code, reason))


def _control(payload: bytes) -> bytes:
    data = bytes(payload)
    if len(data) > MAX_CONTROL_PAYLOAD:
        raise LocalProtocolError(f"control payload over {MAX_CONTROL_PAYLOAD} bytes")
    return data
