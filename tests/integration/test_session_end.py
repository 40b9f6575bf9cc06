"""A session that ends cleanly leaves its finished channels' last bytes to be delivered.

A channel is finished in the multiplexer once both FINs have passed, which can
be well before its receiver has written the last bytes (up to a window) to a
slow local socket. A relay that drains counts such a channel as done and closes
the session; the receiver's end of it must still deliver those bytes and then
a clean end of stream, never a reset: nothing failed.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from benchmarks._cutter import PathCutter
from wstunnel.net import pump

from .log_watch import LogWatch
from .process_helpers import relay_process
from .tunnel_helpers import (
    LOOPBACK,
    Running,
    agent_config,
    echo_exact,
    echo_handler,
    pattern_block,
    receive_until_reset,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)

MiB = 1 << 20
SIZE = 3 * MiB  # (inside the window below: the relay can send it all to a client not reading)
#: Past what the kernel takes for a destination that does not read (the relay's sockets
#: to destinations have no TCP_NOTSENT_LOWAT: a send buffer of up to 4 MiB), and inside
#: the relay's window.
UPLOAD_SIZE = 8 * MiB


async def _send_then_close(stream: trio.SocketStream) -> None:
    """The target: SIZE bytes, FIN, then wait for the client's FIN."""
    async with stream:
        await stream.send_all(pattern_block(b"last", SIZE))
        await stream.send_eof()
        while await stream.receive_some():
            pass


async def _slow_client(port: int) -> trio.SocketStream:
    """A connection whose small receive buffer leaves most of the download with the
    agent until it reads (SO_RCVBUF set before connecting: no autotuning)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    await sock.connect((LOOPBACK, port))
    return trio.SocketStream(sock)


@asynccontextmanager
async def _draining_mid_download(
        nursery: trio.Nursery) -> AsyncIterator[tuple[Running, trio.SocketStream, bytearray]]:
    """A download to a _slow_client (its FIN sent, its first byte read) and the relay
    told to drain (``stop``): yields the relay, the client, and the byte read."""
    target = await serve_target(nursery, _send_then_close)
    relay = await start_relay(nursery, relay_config(drain_timeout=10.0))
    agent = await start_agent(nursery, agent_config(
        relay.ports[0], [target], initial_window=4 * MiB))
    async with await _slow_client(agent.ports[0]) as client:
        await client.send_eof()  # (nothing up: both FINs pass once the relay sent all)
        got = bytearray(await client.receive_some(1))  # (the download runs)
        relay.stop.set()
        yield relay, client, got


async def test_a_draining_relay_leaves_the_last_bytes_of_a_finished_channel_delivered(
        carrier: str, logs: LogWatch) -> None:
    """The relay drains once a download's both FINs have passed, while most of it still
    waits in the agent for a client that has not read yet: the client then reads every
    byte and a clean end of stream, not ECONNRESET."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with _draining_mid_download(nursery) as (relay, client, got):
                await relay.finished.wait()  # drained: it closed the session, then stopped
                await trio.testing.wait_all_tasks_blocked()  # (the agent's side of the close)
                while data := await client.receive_some(256 * 1024):
                    got += data
            nursery.cancel_scope.cancel()
    assert bytes(got) == pattern_block(b"last", SIZE)
    assert any("session down: closed with code 1001" in line for line in logs.lines)


async def test_a_client_that_takes_nothing_is_reset_once_the_session_has_ended(
        monkeypatch: pytest.MonkeyPatch, logs: LogWatch) -> None:
    """The last bytes' wait is bounded: a client that takes none of them for
    LAST_BYTES_TIMEOUT after the session ended is reset (ECONNRESET after what it
    had), and the agent's log says so."""
    monkeypatch.setattr(pump, "LAST_BYTES_TIMEOUT", 0.2)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with _draining_mid_download(nursery) as (_, client, got):
                await logs.wait_for("took none of its last bytes for 0.2 s")
                got += await receive_until_reset(client)
            nursery.cancel_scope.cancel()
    assert 0 < len(got) < SIZE
    assert got == pattern_block(b"last", SIZE)[:len(got)]


async def test_a_lost_session_does_not_wait_for_a_slow_reader_before_the_next(
        monkeypatch: pytest.MonkeyPatch, logs: LogWatch) -> None:
    """The session is lost (no resumption) while a finished download still waits in the
    agent for a client that is not reading: the next session comes at once, and a new
    connection is carried, without waiting for that client; which then still gets
    every byte and a clean end."""
    monkeypatch.setattr(pump, "LAST_BYTES_TIMEOUT", 60.0)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, _send_then_close)
            echo = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(resume_grace=0.0))
            cutter = PathCutter(relay.ports[0])
            await nursery.start(cutter.serve)
            agent = await start_agent(nursery, agent_config(
                cutter.port, [target, echo], initial_window=4 * MiB,
                reconnect_min_interval=0.05, reconnect_max_interval=0.2))
            async with await _slow_client(agent.ports[0]) as slow:
                await slow.send_eof()
                got = bytearray(await slow.receive_some(1))
                await logs.wait_for_count("session up to", 1)
                await trio.testing.wait_all_tasks_blocked()  # (both FINs passed)
                cutter.cut()
                with trio.fail_after(5):  # (well inside LAST_BYTES_TIMEOUT)
                    await logs.wait_for_count("session up to", 2)
                    async with await trio.open_tcp_stream(LOOPBACK, agent.ports[1]) as other:
                        assert await echo_exact(other, b"next") == b"next"
                while data := await slow.receive_some(256 * 1024):
                    got += data
            nursery.cancel_scope.cancel()
    assert bytes(got) == pattern_block(b"last", SIZE)


async def _slow_target(nursery: trio.Nursery,
                       handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    """``serve_target`` whose accepted connections have a small receive buffer."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    await sock.bind((LOOPBACK, 0))
    sock.listen()
    await nursery.start(trio.serve_listeners, handler, [trio.SocketListener(sock)])
    return int(sock.getsockname()[1])


async def test_an_agent_that_stops_leaves_the_last_bytes_of_an_upload_delivered(
        carrier: str, request: pytest.FixtureRequest) -> None:
    """The mirror case: an agent that shuts down closes its session once its channels
    are done, while the relay still holds most of the upload for a destination that
    has not read yet: the destination then reads every byte and a clean end of
    stream, not ECONNRESET."""
    if carrier == "splice":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "the relay's splice task (no epoll) runs in the session's nursery, "
            "cancelled as the session ends: the destination is reset")))
    received: list[bytes] = []

    async def read_after_session(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_eof()  # (nothing back: both FINs pass once the agent sent all)
            got = bytearray(await stream.receive_some(1))  # (the upload runs)
            started.set()
            await agent.finished.wait()  # it closed the session, then stopped
            await trio.testing.wait_all_tasks_blocked()  # (the relay's side of the close)
            while data := await stream.receive_some(256 * 1024):
                got += data
            received.append(bytes(got))
            delivered.set()

    started, delivered = trio.Event(), trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await _slow_target(nursery, read_after_session)
            relay = await start_relay(nursery, relay_config(initial_window=12 * MiB))
            agent = await start_agent(nursery, agent_config(relay.ports[0], [target],
                                                            drain_timeout=10.0))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as client:
                await client.send_all(pattern_block(b"last", UPLOAD_SIZE))
                await client.send_eof()
                await started.wait()
                agent.stop.set()
                assert await client.receive_some() == b""
            await delivered.wait()
            nursery.cancel_scope.cancel()
    assert received == [pattern_block(b"last", UPLOAD_SIZE)]


async def test_a_relay_process_that_stops_writes_an_uploads_last_bytes_before_it_exits(
        tmp_path: Path) -> None:
    """A relay that drains closes the session once an upload's both FINs have passed,
    while it still holds most of it for a destination that reads slowly: its process
    writes them (within drain_timeout) before it exits, whose end would reset the
    destination, which then reads every byte and a clean end of stream."""
    config = tmp_path / "relay.yaml"
    config.write_text("initial_window: 12MiB\ndrain_timeout: 20\n")
    received: list[bytes] = []
    started, session_down, delivered = trio.Event(), trio.Event(), trio.Event()

    async def read_slowly_after_session(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_eof()  # (nothing back: both FINs pass once the agent sent all)
            got = bytearray(await stream.receive_some(1))  # (the upload runs)
            started.set()
            await session_down.wait()
            try:
                while data := await stream.receive_some(64 * 1024):
                    got += data
                    await trio.sleep(0.005)  # (slower than a process takes to exit)
                received.append(bytes(got))
            except trio.BrokenResourceError:
                received.append(b"reset after %d bytes" % len(got))
            delivered.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            target = await _slow_target(nursery, read_slowly_after_session)
            async with relay_process("-c", str(config)) as (relay, port):
                agent = await start_agent(nursery, agent_config(port, [target]))
                async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as client:
                    await client.send_all(pattern_block(b"last", UPLOAD_SIZE))
                    await client.send_eof()
                    await started.wait()
                    relay.process.send_signal(signal.SIGTERM)
                    await relay.wait_for(rb"session down")
                    session_down.set()
                    await delivered.wait()
                assert await relay.process.wait() == 0
            nursery.cancel_scope.cancel()
    assert received == [pattern_block(b"last", UPLOAD_SIZE)]
