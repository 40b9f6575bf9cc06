"""What waits for a local socket or reader, without a per-record overhead.

Why: a received DATA payload waits (for a slow local socket, in the socket pump;
for a channel's reader, in its queue) as the object the multiplexer gave it: a
bytes or memoryview of its own, about 50 to 200 bytes beyond its payload. A
peer that sends 2-byte records to a destination that does not read would then
make one window's worth of waiting data cost 25 to 100 times its size, past
``max_buffered_size`` (docs/SECURITY.md, "Memory per session"). Joining small
payloads as they queue keeps what waits within a few bytes of its size; bulk
payloads (16 KiB and more) are queued as they are, with no copy.
"""

from __future__ import annotations

from collections import deque
from typing import Final

__all__ = ["SMALL", "queue_piece"]

#: Payloads shorter than this are copied onto the piece before them.
SMALL: Final = 4096
#: ... while that piece is shorter than this (a sendmsg piece, a read's worth).
_JOINED_MAX: Final = 64 * 1024


def queue_piece(pieces: list[bytes | bytearray | memoryview]
                | deque[bytes | bytearray | memoryview],
                data: bytes | bytearray | memoryview) -> None:
    """Append ``data`` to ``pieces``: onto the last piece when both are small."""
    if len(data) < SMALL and pieces:
        last = pieces[-1]
        if len(last) < _JOINED_MAX:
            if type(last) is not bytearray:  # (ours alone: never one handed out)
                if len(last) >= SMALL:
                    pieces.append(data)
                    return
                last = pieces[-1] = bytearray(last)
            last += data
            return
    pieces.append(data)
