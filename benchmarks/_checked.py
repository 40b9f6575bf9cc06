"""Checked connections for benchmarks/faults.py: every byte known in advance, every
ending named, at both ends.

A connection opens with one line, ``D <size> <seed>\\n`` (the target sends
<size> bytes) or ``U <size> <seed>\\n`` (the client sends them, then
half-closes). The bytes are the stream ``Pattern(seed)``, so a reader checks
each byte as it arrives: a stream that ends early is known to be an exact
prefix of what was sent, or corrupt. Both ends also hash what they send and
receive (sha256 end to end; an upload's target answers ``<count> <sha256>``
through the tunnel once the client's EOF has arrived).

Endings, as each end sees them:
    intact           every byte, the same sha256, then a clean end
    reset            ECONNRESET or another socket error: the failure was visible
    clean-EOF-short  a clean end of stream (FIN) before every byte arrived: a
                     failure that looks like success; MUST be 0
    corrupt          a byte that differs from what was sent: MUST be 0
    timeout          no ending within the connection's time limit
    injected         this end was reset on purpose by the fault injector
    relay-killed     (destination ends) open when the relay was SIGKILLed

A socket is never read and written by two tasks at once: a send that fails
with ECONNRESET consumes the error, and a read running alongside would then
see what looks like a clean EOF. So each end takes turns, and a writer tells
the two cases apart by the error: ECONNRESET is a reset; EPIPE means the
peer's FIN came first (a reader would have seen a clean EOF).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import random
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import trio

INTACT: Final = "intact"
RESET: Final = "reset"
EOF_SHORT: Final = "clean-EOF-short"
CORRUPT: Final = "corrupt"
TIMEOUT: Final = "timeout"
INJECTED: Final = "injected"
#: A destination end whose relay was SIGKILLed: the kernel closed it, with FIN or
#: RST as it saw fit, and no program can do better, so it is counted apart.
RELAY_KILLED: Final = "relay-killed"
ENDINGS: Final = (INTACT, RESET, EOF_SHORT, CORRUPT, TIMEOUT, INJECTED)
#: Endings that mean the tunnel lied to an application.
FAILURES: Final = (EOF_SHORT, CORRUPT)

CHUNK: Final = 64 * 1024
_BLOCK: Final = random.Random(15).randbytes(1 << 20)
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)


class Pattern:
    """The byte stream for one seed: 64 KiB pieces of one random block, each
    starting where the seed and its index say, so no two streams (and no two
    pieces of one) line up by accident."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._index = 0
        self._piece = memoryview(b"")

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes of the stream."""
        parts = []
        while size > 0:
            if not self._piece:
                start = (self._seed * 7_919 + self._index * 104_729) % (len(_BLOCK) - CHUNK)
                self._piece = memoryview(_BLOCK)[start:start + CHUNK]
                self._index += 1
            part, self._piece = self._piece[:size], self._piece[size:]
            parts.append(part)
            size -= len(part)
        return b"".join(parts)


@dataclass
class End:
    """One end of a checked connection: how it ended, and the fault injector's handles."""

    ending: str | None = None
    error: str = ""
    #: Set while this end has a live socket the injector may reset or stall.
    live: bool = False
    stall_until: float = 0.0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    injected: bool = False

    def end(self, ending: str, error: str = "") -> None:
        """Record the ending; the first one counts."""
        if self.ending is None:
            self.ending, self.error = ending, error

    def inject_reset(self) -> None:
        """Reset this end's socket (SO_LINGER 0) from outside, at once."""
        self.injected = True
        self.scope.cancel()

    async def wait_if_stalled(self) -> None:
        if self.stall_until > trio.current_time():
            await trio.sleep_until(self.stall_until)


@dataclass
class Connection:
    """One checked connection: what it carries, and how each end saw it end."""

    seed: int
    upload: bool
    size: int
    client: End = field(default_factory=End)
    target: End = field(default_factory=End)
    sent_sha256: str | None = None

    @property
    def header(self) -> bytes:
        return b"%s %d %d\n" % (b"U" if self.upload else b"D", self.size, self.seed)


def error_name(exc: BaseException) -> str:
    """ECONNRESET, EPIPE, ... for a socket error (trio's or the OS's), else the text."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    grouped = getattr(cause.__cause__, "exceptions", None) if cause is not None else None
    if grouped:  # trio.open_tcp_stream: "all attempts failed", each attempt's error inside
        cause = grouped[0]
    code = getattr(cause, "errno", None)
    return errno.errorcode.get(code, str(code)) if code else f"{type(cause).__name__}: {cause}"


def writer_ending(exc: BaseException, stream: trio.SocketStream) -> tuple[str, str]:
    """(ending, error name) after a failed send or half-close: EPIPE means the
    peer's FIN came first (see the module docstring). A half-close after the reset
    fails with ENOTCONN and leaves the reset's own error pending: that one counts."""
    name = error_name(exc)
    if name == "ENOTCONN":
        with contextlib.suppress(OSError):
            pending = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            name = errno.errorcode.get(pending, name)
    return (EOF_SHORT if name == "EPIPE" else RESET), name


async def close(stream: trio.SocketStream, end: End) -> None:
    """Close normally, or with RST when the injector reset this end."""
    end.live = False
    if end.injected:
        end.end(INJECTED)
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    await trio.aclose_forcefully(stream)


async def read_checked(stream: trio.SocketStream, end: End, pattern: Pattern, size: int,
                       first: bytes = b"") -> tuple[int, str] | None:
    """Read up to EOF (``first``: what came with the header), checking every byte;
    (count, sha256 hex) at a clean EOF, None once ``end`` has its ending (reset,
    corrupt, more than ``size``)."""
    digest = hashlib.sha256()
    got = 0
    data = first
    while True:
        if got + len(data) > size or data != pattern.take(len(data)):
            end.end(CORRUPT, f"byte {got}")
            return None
        digest.update(data)
        got += len(data)
        await end.wait_if_stalled()
        try:
            data = await stream.receive_some(CHUNK)
        except trio.BrokenResourceError as exc:
            end.end(RESET, error_name(exc))
            return None
        if not data:
            return got, digest.hexdigest()


async def send_checked(stream: trio.SocketStream, end: End, pattern: Pattern,
                       size: int) -> str | None:
    """Send ``size`` bytes of ``pattern`` and half-close; their sha256 hex, or None
    once ``end`` has its ending."""
    digest = hashlib.sha256()
    sent = 0
    try:
        while sent < size:
            data = pattern.take(min(CHUNK, size - sent))
            await stream.send_all(data)
            digest.update(data)
            sent += len(data)
        await stream.send_eof()
    except trio.BrokenResourceError as exc:
        end.end(*writer_ending(exc, stream))
        return None
    return digest.hexdigest()


# -- the client ends ---------------------------------------------------------------


async def run_client(conn: Connection, port: int | str, host: str = "127.0.0.1") -> None:
    """Carry ``conn`` from the client end through the forward on ``host``:``port``
    (a ``str`` port: the path of a unix socket)."""
    end = conn.client
    try:
        if isinstance(port, str):
            stream = await trio.open_unix_socket(port)
        else:
            stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        end.end(RESET, "connect: " + error_name(exc))
        return
    end.live = True
    try:
        with end.scope:
            await _download(conn, stream) if not conn.upload else await _upload(conn, stream)
    finally:
        await close(stream, end)


async def _download(conn: Connection, stream: trio.SocketStream) -> None:
    end = conn.client
    try:
        await stream.send_all(conn.header)
    except trio.BrokenResourceError as exc:
        end.end(RESET, error_name(exc))
        return
    result = await read_checked(stream, end, Pattern(conn.seed), conn.size)
    if result is not None:
        got, sha256 = result
        if got < conn.size:
            end.end(EOF_SHORT, f"{got} of {conn.size} bytes")
        else:
            end.end(INTACT if sha256 == conn.sent_sha256 else CORRUPT, "sha256")


async def _upload(conn: Connection, stream: trio.SocketStream) -> None:
    end = conn.client
    try:
        await stream.send_all(conn.header)
    except trio.BrokenResourceError as exc:
        end.end(*writer_ending(exc, stream))
        return
    sha256 = await send_checked(stream, end, Pattern(conn.seed), conn.size)
    if sha256 is None:
        return
    answer = bytearray()
    try:
        async for data in stream:
            answer += data
    except trio.BrokenResourceError as exc:
        end.end(RESET, error_name(exc))
        return
    if answer == b"%d %s\n" % (conn.size, sha256.encode()):
        end.end(INTACT)
    elif answer.startswith(b"%d " % conn.size):
        end.end(CORRUPT, "sha256")
    else:
        end.end(EOF_SHORT, f"answer {bytes(answer)!r}")


# -- the target ends ---------------------------------------------------------------


class Targets:
    """The destination: one listener; the first line of a connection says what to do."""

    def __init__(self, timeout: float) -> None:
        self.connections: dict[int, Connection] = {}
        self.timeout = timeout
        #: How destination connections ended before their first line arrived
        #: (the session was lost right after the relay dialled).
        self.headerless: Counter[str] = Counter()
        #: Raised when the relay is SIGKILLed (see RELAY_KILLED).
        self.relay_kills = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        kills = self.relay_kills
        header, rest, ending = await _read_header(stream)
        conn = self.connections.get(int(header[2])) if len(header) == 3 else None
        if conn is None:
            self.headerless[RELAY_KILLED if self.relay_kills != kills else ending] += 1
            await trio.aclose_forcefully(stream)
            return
        end = conn.target
        if self.relay_kills != kills:
            end.end(RELAY_KILLED)
        end.live = True
        try:
            with trio.move_on_after(self.timeout), end.scope:
                if conn.upload:
                    await _serve_upload(conn, stream, rest)
                else:
                    await _serve_download(conn, stream)
            if not end.injected:
                end.end(TIMEOUT)  # (if nothing else ended it)
        finally:
            await close(stream, end)


async def _read_header(stream: trio.SocketStream) -> tuple[list[bytes], bytes, str]:
    """(the first line's words, what came after it, how the stream ended if it did)."""
    buffer = b""
    ending = CORRUPT
    try:
        while b"\n" not in buffer and len(buffer) < 64:
            data = await stream.receive_some(CHUNK)
            if not data:
                ending = EOF_SHORT
                break
            buffer += data
    except trio.BrokenResourceError:
        ending = RESET
    line, _, rest = buffer.partition(b"\n")
    return line.split(), rest, ending


async def _serve_download(conn: Connection, stream: trio.SocketStream) -> None:
    end = conn.target
    sha256 = await send_checked(stream, end, Pattern(conn.seed), conn.size)
    if sha256 is None:
        return
    conn.sent_sha256 = sha256
    try:
        while await stream.receive_some(CHUNK):
            pass
    except trio.BrokenResourceError as exc:
        end.end(RESET, error_name(exc))
        return
    end.end(INTACT)


async def _serve_upload(conn: Connection, stream: trio.SocketStream, first: bytes) -> None:
    end = conn.target
    result = await read_checked(stream, end, Pattern(conn.seed), conn.size, first)
    if result is None:
        return
    got, sha256 = result
    end.end(INTACT if got == conn.size else EOF_SHORT, f"{got} of {conn.size} bytes")
    with contextlib.suppress(trio.BrokenResourceError):  # the client reports its view
        await stream.send_all(b"%d %s\n" % (got, sha256.encode()))
