"""A reset is a reset: failures reach the applications at both ends as failures.

Only a clean half-close travels as FIN. When the session is lost (the relay or
the agent killed mid-transfer) or a destination or a client resets its
connection, the socket at the other end is reset after the bytes that came
before the failure: its reader gets those bytes, then ECONNRESET -- never a
clean end of stream short of the length, which a program that reads to EOF
(HTTP/1.0, cat, a file copy, a database dump) takes for a complete result.

The kill tests run agent and relay as processes, so SIGKILL is a real one;
the others run both in-process, once with each way of carrying sockets.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from .process_helpers import agent_process, relay_process
from .tunnel_helpers import (
    LOOPBACK,
    agent_config,
    pattern_block,
    relay_config,
    send_pattern,
    serve_target,
    start_agent,
    start_relay,
    tunnel,
)

MiB = 1 << 20
TRANSFER_SIZE = 64 * MiB  # more than any transfer moves before the kill
#: Every transfer has moved at least this much when a process is killed.
MOVING_SIZE = 64 * 1024
#: Bytes a destination or a client sends before it resets.
BEFORE_RESET_SIZE = 100_000
INTACT, RESET, CLEAN_EOF, CLEAN_EOF_SHORT = "intact", "reset", "clean EOF", "clean EOF short"

_LINGER_ZERO = struct.pack("ii", 1, 0)
_SIOCOUTQNSD = 0x894B  # bytes written to a TCP socket and not yet sent (Linux)
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def _ending(exc: trio.BrokenResourceError) -> str:
    cause = exc.__cause__
    return RESET if isinstance(cause, ConnectionResetError) else f"error {cause!r}"


async def read_to_end(stream: trio.SocketStream, *, pause: float = 0.0) -> tuple[bytes, str]:
    """Everything that arrives, and how the stream ended (CLEAN_EOF, RESET, ...).
    With ``pause``, a slow reader: 4 KiB at a time, ``pause`` seconds apart."""
    chunks = []
    try:
        while data := await stream.receive_some(4096 if pause else None):
            chunks.append(data)
            await trio.sleep(pause)
    except trio.BrokenResourceError as exc:
        return b"".join(chunks), _ending(exc)
    return b"".join(chunks), CLEAN_EOF


async def reset_when_sent(stream: trio.SocketStream) -> None:
    """Close with RST, as a program that sets SO_LINGER {1, 0} does, once the
    kernel has sent what was written (an abortive close discards the rest)."""
    sock = stream.socket
    sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, 1)  # writable = all sent
    while struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, b"\0" * 4))[0]:
        await sock.wait_writable()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    await trio.aclose_forcefully(stream)


# -- session lost: the relay or the agent killed mid-transfer -----------------------


class Transfers:
    """The destination of the kill tests. A connection starting with b"D" gets
    TRANSFER_SIZE bytes; one starting with b"U" is counted until it ends, and how
    it ended here is kept (for uploads the destination is the reader)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.moving = 0
        self.all_moving = trio.Event()
        self.upload_endings: Counter[str] = Counter()
        self.all_uploads_ended = trio.Event()

    def progress(self, before: int, now: int) -> None:
        """Count a transfer as under way once it has moved MOVING_SIZE bytes."""
        if before < MOVING_SIZE <= now:
            self.moving += 1
            if self.moving == self.count:
                self.all_moving.set()

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):  # the killed side's business
                kind = await stream.receive_some(1)
                if kind == b"D":
                    await send_pattern(stream, TRANSFER_SIZE, b"down")
                elif kind == b"U":
                    await self._receive(stream)

    async def _receive(self, stream: trio.SocketStream) -> None:
        got = 0
        try:
            async for data in stream:
                self.progress(got, got + len(data))
                got += len(data)
        except trio.BrokenResourceError as exc:
            self._ended(_ending(exc))
            return
        self._ended(INTACT if got == TRANSFER_SIZE else CLEAN_EOF_SHORT)
        await stream.send_all(b"%d\n" % got)

    def _ended(self, ending: str) -> None:
        self.upload_endings[ending] += 1
        if self.upload_endings.total() == self.count:
            self.all_uploads_ended.set()


async def download(port: int, transfers: Transfers, endings: Counter[str]) -> None:
    """Read TRANSFER_SIZE bytes; count how the connection ended."""
    got = 0
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(b"D")
        try:
            async for data in stream:
                transfers.progress(got, got + len(data))
                got += len(data)
        except trio.BrokenResourceError as exc:
            endings[_ending(exc)] += 1
            return
    endings[INTACT if got == TRANSFER_SIZE else CLEAN_EOF_SHORT] += 1


async def upload(port: int, endings: Counter[str]) -> None:
    """Send TRANSFER_SIZE bytes, half-close, read the answer; count how it ended.

    Sending and reading take turns: with both at once, a reset that the send
    reported leaves a clean-looking EOF for the reader (trio returns from the
    failed send after a checkpoint, so the reader may even run first).
    """
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        try:
            await stream.send_all(b"U")
            await send_pattern(stream, TRANSFER_SIZE, b"up")
            await stream.send_eof()
        except trio.BrokenResourceError as exc:
            endings[_sending_ending(exc)] += 1
            return
        answer, ending = await read_to_end(stream)
    intact = ending == CLEAN_EOF and answer == b"%d\n" % TRANSFER_SIZE
    endings[INTACT if intact else CLEAN_EOF_SHORT if ending == CLEAN_EOF else ending] += 1


def _sending_ending(exc: trio.BrokenResourceError) -> str:
    """How a connection ended, seen by a sender: ECONNRESET is a reset; EPIPE means
    the peer's FIN came first (a reader would have seen a clean EOF), and its
    kernel reset the connection only because more data arrived."""
    if isinstance(exc.__cause__, BrokenPipeError):
        return CLEAN_EOF_SHORT
    return _ending(exc)


async def test_relay_killed_mid_transfer_resets_every_local_connection() -> None:
    """SIGKILL the relay while 50 downloads and 50 uploads are under way: once the
    agent has given up resuming (the relay's resume grace, 1 s here), every local
    connection is reset (ECONNRESET); none ends with a clean EOF short of its length."""
    downloads: Counter[str] = Counter()
    uploads: Counter[str] = Counter()
    transfers = Transfers(100)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            target_port = await serve_target(nursery, transfers.handle)
            async with relay_process("--resume-grace", "1") as (relay, relay_port), \
                    agent_process(relay_port, target_port) as (agent, port):
                async with trio.open_nursery() as clients:
                    for _ in range(50):
                        clients.start_soon(download, port, transfers, downloads)
                        clients.start_soon(upload, port, uploads)
                    await transfers.all_moving.wait()
                    relay.kill()
            nursery.cancel_scope.cancel()
    endings = f"downloads {dict(downloads)}, uploads {dict(uploads)}"
    assert downloads == uploads == {RESET: 50}, f"{endings}\n{agent.text()}"


async def test_agent_killed_mid_upload_resets_every_destination_connection() -> None:
    """SIGKILL the agent while the relay carries 50 uploads: once its resume grace
    (1 s here) is over, every destination connection is reset (ECONNRESET); none ends
    with a clean EOF short of its length."""
    transfers = Transfers(50)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            target_port = await serve_target(nursery, transfers.handle)
            async with relay_process("--resume-grace", "1") as (relay, relay_port), \
                    agent_process(relay_port, target_port) as (agent, port):
                async with trio.open_nursery() as clients:
                    for _ in range(50):
                        clients.start_soon(upload, port, Counter[str]())
                    await transfers.all_moving.wait()
                    agent.kill()
                with trio.fail_after(10):
                    await transfers.all_uploads_ended.wait()
            nursery.cancel_scope.cancel()
    assert transfers.upload_endings == {RESET: 50}, f"{transfers.upload_endings}\n{relay.text()}"


# -- one connection resets: the other end sees the bytes, then the reset ------------


def destination_resetting(after: int, reset: trio.Event) -> Handler:
    """A destination that sends ``after`` bytes, then resets the connection."""

    async def handler(stream: trio.SocketStream) -> None:
        await send_pattern(stream, after, b"before the reset")
        await reset_when_sent(stream)
        reset.set()

    return handler


@pytest.mark.usefixtures("carrier")
async def test_destination_reset_reaches_the_client_after_its_bytes() -> None:
    """A destination sends 100,000 bytes and resets: the client reads exactly those
    bytes, then ECONNRESET."""
    reset = trio.Event()
    with trio.fail_after(10):
        async with tunnel([destination_resetting(BEFORE_RESET_SIZE, reset)]) as (ports, _, _):
            async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                got = await read_to_end(stream)
    assert reset.is_set()
    assert got == (pattern_block(b"before the reset", BEFORE_RESET_SIZE), RESET)


async def open_small_window(port: int) -> trio.SocketStream:
    """A connection whose receive buffer holds a few KiB: what a reader does not take
    stays with the sender."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    await sock.connect((LOOPBACK, port))
    return trio.SocketStream(sock)


@pytest.mark.usefixtures("carrier")
async def test_destination_reset_reaches_a_client_that_reads_late() -> None:
    """The same for a slow client whose socket holds only a few KiB and which starts
    reading only after the destination has reset and the tunnel has handled it: the
    agent holds the rest, and all of it still comes first, then ECONNRESET."""
    reset = trio.Event()
    with trio.fail_after(10):
        async with tunnel([destination_resetting(BEFORE_RESET_SIZE, reset)]) as (ports, _, _):
            async with await open_small_window(ports[0]) as stream:
                await reset.wait()
                await trio.testing.wait_all_tasks_blocked()
                got = await read_to_end(stream, pause=0.002)
    assert got == (pattern_block(b"before the reset", BEFORE_RESET_SIZE), RESET)


@pytest.mark.usefixtures("carrier")
async def test_client_reset_reaches_the_destination_after_its_bytes() -> None:
    """A client sends 100,000 bytes and resets: the destination reads exactly those
    bytes, then ECONNRESET."""
    seen: list[tuple[bytes, str]] = []
    done = trio.Event()

    async def destination(stream: trio.SocketStream) -> None:
        seen.append(await read_to_end(stream))
        done.set()

    with trio.fail_after(10):
        async with tunnel([destination]) as (ports, _, _):
            stream = await trio.open_tcp_stream(LOOPBACK, ports[0])
            await send_pattern(stream, BEFORE_RESET_SIZE, b"then a reset")
            await reset_when_sent(stream)
            await done.wait()
    assert seen == [(pattern_block(b"then a reset", BEFORE_RESET_SIZE), RESET)]


@pytest.mark.usefixtures("carrier")
async def test_client_reset_reaches_a_destination_that_reads_late() -> None:
    """The same for a slow destination whose socket holds only a few KiB and which
    starts reading only after the client has reset and the tunnel has handled it:
    the relay holds the rest, and all of it still comes first, then ECONNRESET."""
    seen: list[tuple[bytes, str]] = []
    client_reset, done = trio.Event(), trio.Event()

    async def destination(stream: trio.SocketStream) -> None:
        await client_reset.wait()
        await trio.testing.wait_all_tasks_blocked()
        seen.append(await read_to_end(stream, pause=0.002))
        done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
            listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await nursery.start(trio.serve_listeners, destination, listeners)
            relay = await start_relay(nursery, relay_config())
            target = listeners[0].socket.getsockname()[1]
            agent = await start_agent(nursery, agent_config(relay.ports[0], [target]))
            stream = await trio.open_tcp_stream(LOOPBACK, agent.ports[0])
            await send_pattern(stream, BEFORE_RESET_SIZE, b"then a reset")
            await reset_when_sent(stream)
            client_reset.set()
            await done.wait()
            nursery.cancel_scope.cancel()
    assert seen == [(pattern_block(b"then a reset", BEFORE_RESET_SIZE), RESET)]


# -- a clean half-close still travels as FIN, both ways ------------------------------


@pytest.mark.usefixtures("carrier")
async def test_client_half_close_then_the_destination_answers_and_closes() -> None:
    """The client sends and shuts down its write side; the destination reads to EOF,
    answers everything back and closes: the client reads it all, then a clean EOF."""
    payload = pattern_block(b"request", 300_000)

    async def destination(stream: trio.SocketStream) -> None:
        async with stream:
            data, ending = await read_to_end(stream)
            assert ending == CLEAN_EOF
            await stream.send_all(data)

    with trio.fail_after(10):
        async with tunnel([destination]) as (ports, _, _):
            async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                await stream.send_all(payload)
                await stream.send_eof()
                assert await read_to_end(stream) == (payload, CLEAN_EOF)


@pytest.mark.usefixtures("carrier")
async def test_destination_half_close_then_the_client_answers_and_closes() -> None:
    """The reverse: the destination sends and shuts down its write side; the client
    reads it all and a clean EOF, then answers and closes: the destination reads the
    answer, then a clean EOF."""
    payload = pattern_block(b"response", 300_000)
    seen: list[tuple[bytes, str]] = []
    done = trio.Event()

    async def destination(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            seen.append(await read_to_end(stream))
            done.set()

    with trio.fail_after(10):
        async with tunnel([destination]) as (ports, _, _):
            async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                assert await read_to_end(stream) == (payload, CLEAN_EOF)
                await stream.send_all(b"all of it, thanks")
            await done.wait()
    assert seen == [(b"all of it, thanks", CLEAN_EOF)]
