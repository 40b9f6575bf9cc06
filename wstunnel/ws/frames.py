"""RFC 6455 section 5 framing: encode frames, decode a byte stream into frames.

Theory of operation: the decoder owns a ``ReceiveBuffer`` and turns it into
``Frame`` records one at a time.  Everything that can be judged from a frame
header is judged as soon as the header is complete, *before* its payload is
buffered: RSV bits, reserved opcodes, control-frame rules, the masking
direction, minimal length encoding, continuation sequencing and the frame
and message size limits.  A parsed header is cached while its payload is still
arriving, so a large frame is parsed once however it is split; a big payload
may then be read straight into a buffer of its own (``receive_buffer``), which
spares the copy that joins reads and the one that cuts the payload out
(ws:// download CPU -7 %, docs/PERFORMANCE.md).  Payload-level rules (UTF-8,
close codes) belong to ``connection.py``.

The decoder raises ``RemoteProtocolError`` (``code`` is the close code) and
stays failed: later calls raise the same error.  ``WebSocketConnection``
turns that into a close; nothing here ever mutates state after a failure.

Masking lives in ``masking.py``.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from ..errors import PayloadTooBig, RemoteProtocolError
from ..slotted import Slotted
from ._buffer import ReceiveBuffer
from .masking import (
    ACCELERATED,
    INT_MASK_LIMIT,
    mask,
    mask_int,
    mask_lanes,
    masked_frame,
    new_buffer,
)

__all__ = [
    "Opcode",
    "CloseCode",
    "Frame",
    "FrameDecoder",
    "encode_frame",
    "encode_frame_parts",
    "encode_masked_frame",
    "encode_binary_parts",
    "mask",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_CONTROL_PAYLOAD",
]


class Opcode(enum.IntEnum):
    """Frame opcodes defined by RFC 6455 section 5.2 (others are reserved)."""

    CONTINUATION = 0
    TEXT = 1
    BINARY = 2
    CLOSE = 8
    PING = 9
    PONG = 10


class CloseCode(enum.IntEnum):
    """Close status codes from RFC 6455 section 7.4.1 and the IANA registry."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005
    ABNORMAL_CLOSURE = 1006
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


class Frame(Slotted):
    """One frame as it appeared on the wire, payload already unmasked.

    A long masked payload is the ``bytearray`` it was unmasked in (one copy
    fewer); nothing else refers to it, so treat it as read-only.
    """

    __slots__ = ("opcode", "payload", "fin", "rsv")

    def __init__(
        self, opcode: Opcode, payload: bytes | bytearray, fin: bool = True, rsv: int = 0
    ) -> None:
        self.opcode: Final = opcode
        self.payload: Final = payload
        self.fin: Final = fin
        self.rsv: Final = rsv


DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20
#: A data frame's payload this big is read into a buffer of its own
#: (``FrameDecoder.receive_buffer``); smaller ones are cut out of the reads.
DIRECT_MIN_SIZE: Final = 64 * 1024
#: What is read after a big payload: room for the next header and small frames
#: (a WINDOW, an interactive chunk), so that a big payload behind them is not
#: read ahead in a big read, only its first few KiB at most.
HEADER_ROOM_SIZE: Final = 4 * 1024
#: RFC 6455 5.5: "All control frames MUST have a payload length of 125 bytes or less".
MAX_CONTROL_PAYLOAD: Final = 125

_HEAD: Final = struct.Struct("!BB")
_HEAD16: Final = struct.Struct("!BBH")
_HEAD64: Final = struct.Struct("!BBQ")
_U16: Final = struct.Struct("!H")
_U64: Final = struct.Struct("!Q")
_OPCODE_BY_VALUE: Final[dict[int, Opcode]] = {int(op): op for op in Opcode}
def _encode_header(opcode: int, size: int, fin: bool, rsv: int, mask_key: bytes | None) -> bytes:
    """Build the 2-14 byte header; lengths use the minimal encoding (5.2)."""
    if not 0 <= opcode <= 0xF or not 0 <= rsv <= 7:
        raise ValueError("opcode must be 0-15 and rsv 0-7")
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0 if mask_key is None else 0x80
    if size < 126:
        header = _HEAD.pack(first, mask_bit | size)
    elif size < 0x10000:
        header = _HEAD16.pack(first, mask_bit | 126, size)
    else:
        header = _HEAD64.pack(first, mask_bit | 127, size)
    if mask_key is None:
        return header
    if len(mask_key) != 4:
        raise ValueError("mask_key must be 4 bytes")
    return header + mask_key


def encode_frame_parts(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask_key: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Like ``encode_frame`` but return ``(header, payload_on_wire)`` unjoined.

    A sender that gathers output in a list joins once per flush instead of
    once per frame, saving a copy of every unmasked payload.
    """
    header = _encode_header(opcode, len(payload), fin, rsv, mask_key)
    if mask_key is None or not payload:
        return header, payload
    return header, mask(payload, mask_key)


def encode_masked_frame(opcode: int, payload: bytes, mask_key: bytes) -> bytes | bytearray:
    """One final, masked frame built and masked in a single buffer (client hot path).

    Saves the copy ``encode_frame`` makes to return ``bytes``; the caller
    owns the buffer and must not change it after queueing it.
    """
    return masked_frame(_encode_header(opcode, len(payload), True, 0, mask_key), b"", payload,
                        mask_key)


def encode_binary_parts(prefix: bytes, payload: bytes | bytearray | memoryview,
                        mask_key: bytes | None) -> list[bytes | bytearray | memoryview]:
    """One final BINARY frame whose payload is ``prefix + payload``, without joining them.

    A server gets ``[header + prefix, payload]`` (the transport writes the
    pieces without joining them); a client one buffer, masked in the same
    pass that copies.
    """
    header = _encode_header(Opcode.BINARY, len(prefix) + len(payload), True, 0, mask_key)
    if mask_key is not None:
        return [masked_frame(header, prefix, payload, mask_key)]
    return [header + prefix, payload] if payload else [header + prefix]


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask_key: bytes | None = None,
) -> bytes:
    """Serialize one frame.

    This is a raw encoder: it does not enforce control-frame limits or
    sequencing, so tests can also build invalid frames.  ``WebSocketConnection``
    applies the rules for what it sends.

    Args:
        opcode: 0-15 (an ``Opcode`` or a reserved value).
        payload: frame payload, unmasked.
        fin: the FIN bit.
        rsv: the three RSV bits as an int 0-7.
        mask_key: four bytes to mask with (clients), or None (servers).

    Returns:
        The frame bytes.

    Raises:
        ValueError: opcode, rsv or mask_key out of range.
    """
    size = len(payload)
    if mask_key is None and not rsv and 0 <= opcode <= 0xF:
        # Fast path for servers: one pack, one concatenation.
        first = opcode | 0x80 if fin else opcode
        if size < 126:
            return _HEAD.pack(first, size) + payload
        if size < 0x10000:
            return _HEAD16.pack(first, 126, size) + payload
        return _HEAD64.pack(first, 127, size) + payload
    header = _encode_header(opcode, size, fin, rsv, mask_key)
    if mask_key is None:
        return header + payload
    if size <= INT_MASK_LIMIT:
        return header + mask_int(payload, mask_key) if payload else header
    buf = bytearray(header)
    buf += payload
    mask_lanes(buf, len(header), mask_key)
    return bytes(buf)


# A parsed header: (opcode, fin, header_size, payload_size, mask_key); RSV is
# always 0 here because we negotiate no extension.
_Header = tuple[int, bool, int, int, "bytes | None"]


class FrameDecoder:
    """Incremental frame parser for one direction of one connection.

    Args:
        client: True when we are the client (incoming frames must be unmasked),
            False for a server (incoming frames must be masked).
        max_frame_size: largest payload accepted in one frame (1009 beyond).
        max_message_size: largest sum of data-frame payloads in one message
            (1009 beyond); defaults to ``max_frame_size``.
    """

    def __init__(
        self,
        *,
        client: bool,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_message_size: int | None = None,
    ) -> None:
        self._client = client
        self._max_frame_size = max_frame_size
        self._max_message_size = max_frame_size if max_message_size is None else max_message_size
        self._buffer = ReceiveBuffer()
        self._pending: _Header | None = None
        # A big payload being read into a buffer of its own (receive_buffer).
        self._direct: bytearray | None = None
        self._direct_filled = 0
        # After a big payload the next read fills only this (receive_buffer).
        self._header_room = bytearray(HEADER_ROOM_SIZE)
        self._read_header_next = False
        self._header_read = False  # receive_buffer() returned _header_room
        self._in_message = False  # a non-final TEXT/BINARY frame was seen
        self._message_size = 0
        self._failure: RemoteProtocolError | None = None
        # A final TEXT/BINARY frame this small needs no size bookkeeping.
        self._fast_size_limit = min(self._max_frame_size, self._max_message_size)

    @property
    def buffered_size(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) + (self._direct_filled if self._direct is not None else 0)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; call ``next_frame()`` until it returns None.

        A ``bytearray`` may be kept as the buffer itself: the caller hands it
        over and must not change it afterwards (transports read into a fresh
        one each time).
        """
        self._header_read = self._read_header_next = False
        direct = self._direct
        if direct is not None:  # the front of data finishes a big payload
            filled = self._direct_filled
            taken = min(len(direct) - filled, len(data))
            direct[filled : filled + taken] = memoryview(data)[:taken]
            self._direct_filled = filled + taken
            if taken == len(data):
                return
            data = memoryview(data)[taken:]
        buf = self._buffer
        if isinstance(data, (bytes, bytearray)) and buf.offset >= len(buf.storage):
            buf.storage = data  # fast path of ReceiveBuffer.append: adopt, no copy
            buf.offset = 0
        else:
            buf.append(data)

    def receive_buffer(self) -> memoryview | None:
        """Where to read next so a big payload needs no reassembly, or None.

        When the frame at the front is big and incomplete, its payload gets a
        buffer of its own, and this returns the unfilled rest of it: a
        transport reads straight into it (then ``buffer_filled``), and the
        finished payload is that buffer, so its bytes are not copied once to
        join the reads and again to cut the frame out. Right after such a
        frame, with nothing buffered, it returns a ``HEADER_ROOM_SIZE`` buffer
        for the next header: a read of any size would take the front of a big
        payload behind it, to be copied into that payload's buffer (on a bulk
        upload over wss://, 38 % of the bytes). Release the view before
        calling ``next_frame``.
        """
        if self._direct is None:
            header = self._pending
            if header is None:
                if not self._read_header_next or len(self._buffer):
                    return None
                self._header_read = True
                return memoryview(self._header_room)
            if header[3] < DIRECT_MIN_SIZE:
                return None
            self._start_direct(header[2], header[3])
        return memoryview(self._direct)[self._direct_filled:]  # type: ignore[arg-type]

    def buffer_filled(self, size: int) -> None:
        """``size`` bytes were written at the front of ``receive_buffer()``'s view."""
        if self._header_read:
            if not 0 <= size <= HEADER_ROOM_SIZE:
                raise ValueError(f"{size} bytes do not fit the buffer receive_buffer() gave")
            # (offered once: later reads are ordinary until the next big payload)
            self.receive_data(bytes(memoryview(self._header_room)[:size]))
            return
        direct = self._direct
        if direct is None or not 0 <= size <= len(direct) - self._direct_filled:
            raise ValueError(f"{size} bytes do not fit the buffer receive_buffer() gave")
        self._direct_filled += size

    def _start_direct(self, header_size: int, size: int) -> None:
        buf = self._buffer
        start = buf.offset + header_size
        payload = new_buffer(size)
        have = len(buf.storage) - start  # less than size: the frame is incomplete
        payload[:have] = memoryview(buf.storage)[start:]
        buf.storage = b""
        buf.offset = 0
        self._direct = payload
        self._direct_filled = have

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed.

        Raises:
            RemoteProtocolError: the peer broke a framing rule; ``code`` is the
                close code to send (1002, or 1009 via ``PayloadTooBig``).
        """
        header = self._pending
        if self._direct is not None:
            return self._finish_direct()
        if header is None:
            if self._failure is not None:
                raise self._failure
            buf = self._buffer
            if len(buf.storage) - buf.offset < 2:
                return None  # (no header: the usual end of a read, without a call)
            try:
                header = self._parse_header()
            except RemoteProtocolError as exc:
                self._failure = exc
                raise
            if header is None:
                return None
        opcode, fin, header_size, size, mask_key = header
        buf = self._buffer
        storage = buf.storage
        start = buf.offset + header_size
        end = start + size
        if len(storage) < end:
            self._pending = header
            return None
        self._pending = None
        if mask_key is not None:
            payload = _unmask_slice(storage, start, end, mask_key)
        elif type(storage) is bytes:
            payload = storage[start:end]
        else:
            payload = bytes(memoryview(storage)[start:end])
        # Inline ReceiveBuffer.consume: this runs once per frame.
        if end >= len(storage):
            buf.storage = b""
            buf.offset = 0
        else:
            buf.offset = end
        return Frame(_OPCODE_BY_VALUE[opcode], payload, fin)

    def _finish_direct(self) -> Frame | None:
        """The frame whose payload was read into its own buffer, once it is full."""
        payload = self._direct
        header = self._pending
        assert payload is not None and header is not None
        if self._direct_filled < len(payload):
            return None
        self._direct = None
        self._pending = None
        self._read_header_next = True
        opcode, fin, _, _, mask_key = header
        if mask_key is not None:
            mask_lanes(payload, 0, mask_key)
        return Frame(_OPCODE_BY_VALUE[opcode], payload, fin)

    def _parse_header(self) -> _Header | None:
        """Parse and validate the header at the front, or None if incomplete.

        The common frame (final TEXT/BINARY, no RSV, right masking, within
        limits) takes a short path; anything else goes through the checks.
        """
        buf = self._buffer
        storage = buf.storage
        offset = buf.offset
        available = len(storage) - offset
        if available < 2:
            return None
        first, second = _HEAD.unpack_from(storage, offset)
        size = second & 0x7F
        masked = second > 0x7F
        if first not in (0x81, 0x82) or self._in_message or masked is self._client:
            self._check_start(first & 0x0F, first > 0x7F, (first >> 4) & 7, masked, size)
        header_size = 2
        if size >= 126:
            header_size = 4 if size == 126 else 10
            if available < header_size:
                return None
            size = _extended_length(storage, offset, header_size)
        mask_key = None
        if masked:
            if available < header_size + 4:
                return None
            mask_key = bytes(storage[offset + header_size : offset + header_size + 4])
            header_size += 4
        fin = first > 0x7F
        if not fin or size > self._fast_size_limit or first & 0x0F not in (1, 2):
            self._check_size(first & 0x0F, fin, size)
        return first & 0x0F, fin, header_size, size, mask_key

    def _check_start(self, opcode: int, fin: bool, rsv: int, masked: bool, size: int) -> None:
        """Judge the first two header bytes (RFC 6455 5.2, 5.4, 5.5)."""
        if rsv:
            # 5.2: RSV bits MUST be 0 unless an extension defines them; we negotiate none.
            raise _protocol_error("RSV bits set without a negotiated extension")
        if opcode >= 8:
            if opcode > 10:
                raise _protocol_error(f"reserved control opcode {opcode}")
            if not fin:
                raise _protocol_error("fragmented control frame")  # 5.5: MUST NOT be fragmented
            if size > MAX_CONTROL_PAYLOAD:
                raise _protocol_error("control frame payload over 125 bytes")
        elif opcode > 2:
            raise _protocol_error(f"reserved data opcode {opcode}")
        elif opcode == 0:
            if not self._in_message:
                raise _protocol_error("continuation frame without a message in progress")
        elif self._in_message:
            raise _protocol_error("new data frame while a fragmented message is in progress")
        if masked == self._client:
            # 5.1: a server MUST close on an unmasked frame, a client on a masked one.
            direction = "masked frame from server" if masked else "unmasked frame from client"
            raise _protocol_error(direction)

    def _check_size(self, opcode: int, fin: bool, size: int) -> None:
        """Enforce the limits and track the message in progress (before buffering)."""
        if size > self._max_frame_size:
            raise PayloadTooBig(f"frame of {size} bytes exceeds {self._max_frame_size}", 1009)
        if opcode >= 8:
            return
        total = size if opcode else self._message_size + size
        if total > self._max_message_size:
            raise PayloadTooBig(f"message exceeds {self._max_message_size} bytes", 1009)
        self._message_size = total
        self._in_message = not fin


def _extended_length(storage: bytes | bytearray, offset: int, header_size: int) -> int:
    """Read a 16- or 64-bit length and insist on the minimal encoding (5.2)."""
    if header_size == 4:
        (size,) = _U16.unpack_from(storage, offset + 2)
        if size < 126:
            raise _protocol_error("16-bit length used for a payload under 126 bytes")
        return int(size)
    (size,) = _U64.unpack_from(storage, offset + 2)
    if size >> 63:
        raise _protocol_error("64-bit length has its most significant bit set")
    if size < 0x10000:
        raise _protocol_error("64-bit length used for a payload under 64 KiB")
    return int(size)


def _unmask_slice(
    storage: bytes | bytearray, start: int, end: int, mask_key: bytes
) -> bytes | bytearray:
    """Copy ``storage[start:end]`` out unmasked, choosing the faster method by size.

    A long payload comes back as the ``bytearray`` it was unmasked in (one
    copy fewer); nothing else holds a reference to it, so it is never mutated.
    """
    if end - start <= INT_MASK_LIMIT:
        return mask_int(memoryview(storage)[start:end], mask_key) if end > start else b""
    if ACCELERATED:
        return mask(memoryview(storage)[start:end], mask_key)  # copy and XOR in one C pass
    raw = bytearray(memoryview(storage)[start:end])
    mask_lanes(raw, 0, mask_key)
    return raw


def _protocol_error(message: str) -> RemoteProtocolError:
    """A framing violation: close code 1002 (RFC 6455 7.4.1)."""
    return RemoteProtocolError(message, 1002)
