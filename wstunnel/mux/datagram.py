"""UDP datagrams in a channel's byte stream (docs/PROTOCOL.md section 4.2).

A channel of kind UDP carries one flow's datagrams as a byte stream of
length-prefixed messages: a u16 length, then that many payload bytes. The
stream may be cut into DATA records anywhere (a datagram may span records,
a record may hold many), so datagram boundaries survive any chunking and
any peer MAX_CHUNK_SIZE, and flow control, FIN and RESET stay what they are
for TCP. Sans-IO: bytes in, datagrams out.
"""

from __future__ import annotations

import struct
from typing import Final

from ..errors import LocalProtocolError, RemoteProtocolError
from .wire import ErrorCode

__all__ = ["DATAGRAM_HEADER_SIZE", "MAX_DATAGRAM_SIZE", "DatagramDecoder", "frame_datagram"]

#: The largest UDP payload over IPv4 (65,535 - 20 IP - 8 UDP header bytes); one
#: limit for both families, so a datagram that crossed fits any destination.
MAX_DATAGRAM_SIZE: Final = 65507
DATAGRAM_HEADER_SIZE: Final = 2
_LENGTH: Final = struct.Struct("!H")


def frame_datagram(payload: bytes | bytearray | memoryview) -> bytes:
    """The bytes that carry ``payload`` as one datagram (length prefix + payload).

    Raises:
        LocalProtocolError: ``payload`` is over MAX_DATAGRAM_SIZE (the caller drops it).
    """
    size = len(payload)
    if size > MAX_DATAGRAM_SIZE:
        raise LocalProtocolError(f"a datagram of {size} bytes is over the limit of "
                                 f"{MAX_DATAGRAM_SIZE}", code=ErrorCode.PROTOCOL_ERROR)
    return _LENGTH.pack(size) + bytes(payload)


class DatagramDecoder:
    """Splits a UDP channel's byte stream back into datagrams.

    Feed ``receive_data`` what the channel delivers, in order; it returns the
    datagrams completed by it. A length over MAX_DATAGRAM_SIZE is the peer's
    error: the decoder goes terminal, keeps it in ``failure`` (the caller resets
    the channel with PROTOCOL_ERROR) and decodes nothing more.
    ``pending_size`` is what waits for the rest of a datagram (at most one).
    """

    __slots__ = ("_buffer", "failure")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.failure: RemoteProtocolError | None = None

    @property
    def pending_size(self) -> int:
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The datagrams ``data`` completes (possibly none); after a bad length
        prefix, the ones before it and then nothing (check ``failure``)."""
        if self.failure is not None:
            return []
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        start = 0
        end = len(buffer)
        while end - start >= DATAGRAM_HEADER_SIZE:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if size > MAX_DATAGRAM_SIZE:
                self.failure = RemoteProtocolError(
                    f"the peer sent a datagram length of {size}, over {MAX_DATAGRAM_SIZE}",
                    code=ErrorCode.PROTOCOL_ERROR)
                buffer.clear()
                return out
            stop = start + DATAGRAM_HEADER_SIZE + size
            if stop > end:
                break
            out.append(bytes(buffer[start + DATAGRAM_HEADER_SIZE:stop]))
            start = stop
        del buffer[:start]
        return out
