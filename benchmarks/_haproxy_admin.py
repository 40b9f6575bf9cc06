"""One command on haproxy's admin socket (``stats socket``), for the benchmarks and
tests that drive a real haproxy (benchmarks/rolling_restart.py,
tests/integration/test_several_relays.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import trio

__all__ = ["admin_command"]


async def admin_command(path: Path, command: str) -> str:
    """Send ``command``; haproxy's whole answer (it closes the socket after it).

    Raises:
        OSError: no haproxy answers on ``path`` (not started yet, or gone).
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        await sock.send(command.encode() + b"\n")
        answer = b""
        while data := await sock.recv(4096):
            answer += data
    return answer.decode(errors="replace")
