"""One WebSocket connection after the handshake (RFC 6455 sections 5-7), sans-IO.

Theory of operation: bytes from the transport go into ``receive_data``; the
``FrameDecoder`` turns them into frames and judges everything a header can
tell; this module judges payloads (UTF-8 of text, close frames), reassembles
fragmented messages, answers pings and runs the closing handshake.  Output
frames are appended to a list and joined once per ``data_to_send`` call.

States: OPEN -> CLOSING (we sent a close) -> CLOSED, or OPEN -> CLOSED when
the peer closes first (we queue the echo at once), on a protocol error, or
at EOF.  CLOSED is terminal: ``ConnectionClosed`` has been emitted exactly
once, further input is ignored and sending raises ``LocalProtocolError``.

A protocol error never escapes ``receive_data``: we queue our close frame
(unless we already sent one), keep the error in ``failure`` and set
``should_close_transport`` at once.  After a framing error the stream can no
longer be parsed, so waiting for the peer's close would only wait for a
timeout (RFC 6455 7.1.7: "_Fail the WebSocket Connection_").
"""

from __future__ import annotations

import codecs
import enum
import os
from collections.abc import Callable
from typing import Final

from ..errors import LocalProtocolError, RemoteProtocolError
from ..pieces import queue_piece
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
    MAX_CONTROL_PAYLOAD,
    Frame,
    FrameDecoder,
    Opcode,
    encode_binary_parts,
    encode_frame_parts,
    encode_masked_frame,
)
from .masking import INT_MASK_LIMIT

__all__ = [
    "Role",
    "ConnectionState",
    "WebSocketConnection",
    "KeyPool",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "is_valid_close_code",
]

DEFAULT_MAX_MESSAGE_SIZE: Final = 1 << 20
_NO_STATUS: Final = 1005
_ABNORMAL: Final = 1006


class Role(enum.Enum):
    """Which end of the WebSocket we are; decides the masking direction."""

    CLIENT = "client"
    SERVER = "server"


class ConnectionState(enum.Enum):
    """OPEN; CLOSING (we sent close, awaiting the peer's); CLOSED (terminal)."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


# Enum members as module constants: ``ConnectionState.OPEN`` is an attribute
# lookup through the enum metaclass's ``__getattr__`` hook (several hundred
# machine instructions on CPython 3.11), paid on every read and frame; a
# global is a dict hit.
_OPEN: Final = ConnectionState.OPEN
_CLOSING: Final = ConnectionState.CLOSING
_CLOSED: Final = ConnectionState.CLOSED
_TEXT: Final = Opcode.TEXT
_BINARY: Final = Opcode.BINARY
_PING: Final = Opcode.PING
_PONG: Final = Opcode.PONG
#: Pongs queued, not yet drained, before the last one is replaced (``_answer_ping``);
#: a burst of pings below it is answered ping for ping (Autobahn 2.10, 2.11).
_MAX_PONGS_QUEUED: Final = 32
_CLOSE: Final = Opcode.CLOSE


def is_valid_close_code(code: int) -> bool:
    """True for codes a peer may put in a close frame (RFC 6455 7.4, IANA registry).

    1004-1006 and 1015 are reserved or local-only; 1016-2999 are reserved for
    future RFCs; 3000-4999 are for libraries and applications.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _parse_close(payload: bytes) -> tuple[int, str]:
    """Decode a close frame's payload (RFC 6455 5.5.1, 7.1.5, 7.1.6).

    Raises:
        RemoteProtocolError: 1002 for a 1-byte payload or an invalid code,
            1007 when the reason is not UTF-8.
    """
    if not payload:
        return _NO_STATUS, ""
    if len(payload) == 1:
        raise RemoteProtocolError("close frame with a 1-byte payload", 1002)
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        raise RemoteProtocolError(f"close frame with invalid code {code}", 1002)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("close reason is not valid UTF-8", 1007) from exc
    return code, reason


def _close_payload(code: int, reason: str) -> bytes:
    """Encode our close frame; 1005 means "no status" and sends no payload."""
    if code == _NO_STATUS:
        if reason:
            raise LocalProtocolError("a close without a status code cannot carry a reason")
        return b""
    if not is_valid_close_code(code):
        raise LocalProtocolError(f"{code} may not be sent in a close frame")
    encoded = reason.encode("utf-8")
    if len(encoded) > MAX_CONTROL_PAYLOAD - 2:
        raise LocalProtocolError("close reason longer than 123 bytes of UTF-8")
    return code.to_bytes(2, "big") + encoded


class KeyPool:
    """Masking keys cut from one ``source`` call per 4 KiB.

    The keys are as unpredictable as ``source``'s bytes; drawing them 1024 at
    a time saves a getrandom system call per frame (one per 16 KiB on upload).
    """

    __slots__ = ("_source", "_pool", "_used")

    SIZE: Final = 4096

    def __init__(self, source: Callable[[int], bytes]) -> None:
        self._source = source
        self._pool = b""
        self._used = 0

    def __call__(self, size: int) -> bytes:
        used = self._used
        if used + size > len(self._pool):
            self._pool = self._source(max(self.SIZE, size))
            used = 0
        self._used = used + size
        return self._pool[used:used + size]


class WebSocketConnection:
    """Sans-IO WebSocket endpoint: feed bytes in, drain events and bytes out.

    Args:
        role: ``Role.CLIENT`` masks what it sends; ``Role.SERVER`` does not.
        max_message_size: largest message (and frame) accepted; 1009 beyond.
        random_bytes: source of masking keys (default: ``os.urandom`` through
            a ``KeyPool``; inject for tests).
        trailing_data: bytes that followed the handshake in the same read;
            processed at once, so check ``events_received()`` right away.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        random_bytes: Callable[[int], bytes] | None = None,
        trailing_data: bytes = b"",
    ) -> None:
        self.role = role
        self._client = role is Role.CLIENT
        self._random_bytes = random_bytes or KeyPool(os.urandom)
        self._decoder = FrameDecoder(
            client=self._client, max_frame_size=max_message_size, max_message_size=max_message_size
        )
        self._events: list[Event] = []
        self._output: list[bytes | bytearray | memoryview] = []
        self.state = _OPEN
        self.failure: RemoteProtocolError | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.should_close_transport = False
        # The message being assembled: big fragments as they came, small ones joined
        # (pieces.py: empty or 1-byte continuation frames must not cost an object each;
        # max_message_size counts bytes, not frames).
        self._fragments: list[bytes | bytearray | memoryview] = []
        self._utf8: codecs.IncrementalDecoder | None = None  # set while a text message is open
        #: Where in ``_output`` the last pong not yet drained is, and how many are
        #: queued (``_answer_ping``).
        self._pong_at: int | None = None
        self._pongs_queued = 0
        if trailing_data:
            self.receive_data(trailing_data)

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Process bytes from the transport; never raises for peer misbehaviour.

        Afterwards call ``events_received()`` and ``data_to_send()`` (a pong or
        close may be queued), then check ``should_close_transport``.
        """
        if self.state is _CLOSED:
            return
        self._decoder.receive_data(data)
        self._decode()

    def receive_buffer(self) -> memoryview | None:
        """Where a transport may read next, instead of ``receive_data``, or None.

        A big frame's payload then arrives in a buffer of its own without being
        copied (``FrameDecoder.receive_buffer``). Release the view, then call
        ``buffer_filled`` with the count read.
        """
        if self.state is _CLOSED:
            return None
        return self._decoder.receive_buffer()

    def buffer_filled(self, size: int) -> None:
        """``size`` bytes were read into ``receive_buffer()``; process as ``receive_data``."""
        if self.state is _CLOSED:
            return
        self._decoder.buffer_filled(size)
        self._decode()

    def _decode(self) -> None:
        decoder = self._decoder
        try:
            while not self.should_close_transport:  # i.e. not CLOSED
                frame = decoder.next_frame()
                if frame is None:
                    break
                self._handle_frame(frame)
        except RemoteProtocolError as exc:
            self._fail(exc)

    def receive_eof(self) -> None:
        """The transport's read side ended; idempotent.

        Without a close handshake this ends the connection with code 1006.
        """
        if self.state is not _CLOSED:
            self._finish(_ABNORMAL, "connection lost without a close frame")

    # -- output --------------------------------------------------------------

    def events_received(self) -> list[Event]:
        """Return and forget the events produced since the last call."""
        events = self._events
        self._events = []
        return events

    @property
    def has_output(self) -> bool:
        """True when ``data_to_send`` would return bytes."""
        return bool(self._output)

    def data_to_send(self) -> bytes | bytearray:
        """Return and forget the bytes to write to the transport (a new object:
        the caller may keep it; nothing here changes it afterwards)."""
        output = self._output
        if not output:
            return b""
        self._output = []
        self._pong_at, self._pongs_queued = None, 0
        first = output[0]
        if len(output) > 1 or type(first) is memoryview:
            return b"".join(output)
        return first

    def data_to_send_parts(self) -> list[bytes | bytearray | memoryview]:
        """``data_to_send`` as the pieces queued, in order, not joined: a server's
        frame is its header and the payload it was given, which a gathering
        write sends without copying the payload once more. Nothing here changes
        the pieces afterwards (payloads come from the multiplexer, which keeps
        bytes and read-only views as given and copies anything writable)."""
        output = self._output
        self._output = []
        self._pong_at, self._pongs_queued = None, 0
        return output

    # -- local actions -------------------------------------------------------

    def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Queue one binary message as a single final frame.

        Raises:
            LocalProtocolError: we already sent a close or the connection is closed.
        """
        self._check_can_send()
        self._send_frame(_BINARY, bytes(data))

    def send_binary_parts(self, prefix: bytes, payload: bytes | bytearray | memoryview) -> None:
        """Queue one binary message ``prefix + payload`` without joining the two
        (the multiplexer's record header and its DATA payload).

        Raises:
            LocalProtocolError: we already sent a close or the connection is closed.
        """
        self._check_can_send()
        self._output.extend(encode_binary_parts(
            prefix, payload, self._random_bytes(4) if self._client else None))

    def send_text(self, text: str) -> None:
        """Queue one text message as a single final frame (see ``send_bytes``)."""
        self._check_can_send()
        self._send_frame(_TEXT, text.encode("utf-8"))

    def ping(self, payload: bytes = b"") -> None:
        """Queue a ping; the answer arrives as ``PongReceived``.

        Raises:
            LocalProtocolError: payload over 125 bytes, or sending is over.
        """
        self._check_can_send()
        self._send_frame(_PING, self._control_payload(payload))

    def pong(self, payload: bytes = b"") -> None:
        """Queue an unsolicited pong (pings are answered automatically)."""
        self._check_can_send()
        self._send_frame(_PONG, self._control_payload(payload))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake; a no-op once closing or closed.

        The state becomes CLOSING until the peer's close arrives.  Flush
        ``data_to_send()``; drop the transport when ``should_close_transport``
        turns true, or after a timeout of your choosing.

        Args:
            code: close code to send; 1005 sends a close frame without a code.
            reason: UTF-8 text up to 123 bytes.

        Raises:
            LocalProtocolError: the code may not be sent or the reason is too long.
        """
        if self.state is not _OPEN:
            return
        self._send_frame(_CLOSE, _close_payload(code, reason))
        self.state = _CLOSING

    # -- internals -----------------------------------------------------------

    def _check_can_send(self) -> None:
        if self.state is not _OPEN:
            raise LocalProtocolError(f"cannot send: connection is {self.state.value}")

    @staticmethod
    def _control_payload(payload: bytes) -> bytes:
        data = bytes(payload)
        if len(data) > MAX_CONTROL_PAYLOAD:
            raise LocalProtocolError("control frame payload over 125 bytes")
        return data

    def _send_frame(self, opcode: Opcode, payload: bytes) -> None:
        """Frame and queue; clients mask with a fresh key each time (RFC 6455 5.3)."""
        if not self._client:
            header, body = encode_frame_parts(opcode, payload)
            self._output.append(header)
            if body:
                self._output.append(body)
            return
        mask_key = self._random_bytes(4)
        if len(payload) > INT_MASK_LIMIT:
            self._output.append(encode_masked_frame(opcode, payload, mask_key))
            return
        header, body = encode_frame_parts(opcode, payload, mask_key=mask_key)
        self._output.append(header)
        if body:
            self._output.append(body)

    def _handle_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode <= _BINARY:
            self._handle_data(frame)
            return
        payload = bytes(frame.payload)  # control payloads are short bytes already: no copy
        if opcode is _PING:
            self._events.append(PingReceived(payload))
            if self.state is _OPEN:
                self._answer_ping(payload)
        elif opcode is _PONG:
            self._events.append(PongReceived(payload))
        else:
            self._handle_close(payload)

    def _answer_ping(self, payload: bytes) -> None:
        """Queue the pong (5.5.2: MUST answer); past ``_MAX_PONGS_QUEUED`` not yet
        drained, replace the last one instead: a peer that pings and does not read
        would otherwise make our output grow without bound (5.5.3: "MAY elect to
        send a Pong frame for only the most recently processed Ping frame"). Each
        pong is one piece, so that it can be replaced."""
        mask_key = self._random_bytes(4) if self._client else None
        pong = b"".join(encode_frame_parts(_PONG, payload, mask_key=mask_key))
        if self._pong_at is not None and self._pongs_queued >= _MAX_PONGS_QUEUED:
            self._output[self._pong_at] = pong
            return
        self._pong_at = len(self._output)
        self._pongs_queued += 1
        self._output.append(pong)

    def _handle_data(self, frame: Frame) -> None:
        """Deliver or reassemble; the decoder has already checked sequencing."""
        opcode, payload, fin = frame.opcode, frame.payload, frame.fin
        if fin and opcode is _BINARY:
            self._events.append(BytesMessage(payload))
        elif fin and opcode is _TEXT:
            self._events.append(TextMessage(_decode_utf8(payload)))
        else:
            self._handle_fragment(opcode, payload, fin)

    def _handle_fragment(self, opcode: Opcode, payload: bytes | bytearray, fin: bool) -> None:
        """One fragment of a message; text is validated as it arrives (fail fast)."""
        if opcode is _TEXT:
            self._utf8 = codecs.getincrementaldecoder("utf-8")()
        elif opcode is _BINARY:
            self._utf8 = None
        if self._utf8 is not None:
            try:
                self._utf8.decode(payload, fin)  # (checked as it comes; decoded at the end)
            except UnicodeDecodeError as exc:
                raise RemoteProtocolError("text message is not valid UTF-8", 1007) from exc
        queue_piece(self._fragments, payload)
        if not fin:
            return
        message = b"".join(self._fragments)
        self._fragments = []
        if self._utf8 is not None:
            self._events.append(TextMessage(message.decode("utf-8")))
            self._utf8 = None
        else:
            self._events.append(BytesMessage(message))

    def _handle_close(self, payload: bytes) -> None:
        """The peer's close: echo it if we have not closed yet (RFC 6455 5.5.1)."""
        code, reason = _parse_close(payload)
        self._events.append(CloseReceived(code, reason))
        if self.state is _OPEN:
            echo = b"" if code == _NO_STATUS else code.to_bytes(2, "big")
            self._send_frame(_CLOSE, echo)
        self._finish(code, reason)

    def _fail(self, exc: RemoteProtocolError) -> None:
        """_Fail the WebSocket Connection_ (7.1.7): send our close, go terminal."""
        self.failure = exc
        if self.state is _OPEN:
            # The reason stays local: never send exception text to the peer.
            self._send_frame(_CLOSE, exc.code.to_bytes(2, "big"))
        self._finish(exc.code, str(exc))

    def _finish(self, code: int, reason: str) -> None:
        self.state = _CLOSED
        self.close_code = code
        self.close_reason = reason
        self.should_close_transport = True
        self._fragments = []
        self._utf8 = None
        self._events.append(ConnectionClosed(code, reason))


def _decode_utf8(payload: bytes | bytearray) -> str:
    """Decode a whole text message (RFC 6455 8.1: invalid UTF-8 fails with 1007)."""
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("text message is not valid UTF-8", 1007) from exc
