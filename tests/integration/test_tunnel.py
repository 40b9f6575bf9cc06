"""End to end on loopback: agent and relay in-process, real TCP sockets."""

from __future__ import annotations

import errno
import logging
import os
import resource
from typing import NoReturn

import pytest
import trio

from wstunnel.addresses import HostPort
from wstunnel.net import pump
from wstunnel.net.ending import abort_stream

from .security_helpers import watch_logs
from .tunnel_helpers import (
    LOOPBACK,
    agent_config,
    digest_handler,
    echo_exact,
    echo_handler,
    expect_reset,
    pattern_block,
    receive_all,
    receive_until_reset,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
    tunnel,
    upload_and_download,
)

MiB = 1 << 20


# Every test here runs twice: local sockets carried by the session's socket pump,
# and by splice (two tasks per channel), the fallback without epoll.
pytestmark = pytest.mark.usefixtures("carrier")


async def test_64_mib_each_way_arrives_intact() -> None:
    """64 MiB up and 64 MiB down through one forward keep their sha256."""
    with trio.fail_after(60):
        async with tunnel([digest_handler(64 * MiB, b"down")]) as (ports, _relay, _agent):
            await upload_and_download(ports[0], 64 * MiB, 64 * MiB)


async def test_200_channels_at_once_all_intact() -> None:
    """200 concurrent connections through one session each get their own bytes back."""
    with trio.fail_after(60):
        async with tunnel([echo_handler]) as (ports, _relay, _agent):

            async def one(index: int) -> None:
                payload = os.urandom(20_000 + index)
                async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(stream.send_all, payload)
                        echoed = bytearray()
                        while len(echoed) < len(payload):
                            echoed += await stream.receive_some()
                    assert bytes(echoed) == payload

            async with trio.open_nursery() as nursery:
                for index in range(200):
                    nursery.start_soon(one, index)


async def test_half_close_reaches_target_and_answer_comes_back() -> None:
    """The client's shutdown(SHUT_WR) reaches the target as EOF; its answer still arrives."""

    async def answer_after_eof(stream: trio.SocketStream) -> None:
        async with stream:
            request = await receive_all(stream)
            await stream.send_all(b"got " + str(len(request)).encode())

    with trio.fail_after(10):
        async with tunnel([answer_after_eof]) as (ports, _relay, _agent):
            async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                await stream.send_all(b"x" * 1000)
                await stream.send_eof()
                assert await receive_all(stream) == b"got 1000"


async def test_agent_out_of_file_descriptors_logs_waits_and_then_carries() -> None:
    """When accept() finds no free descriptor the agent says so, keeps the connection
    waiting in the backlog and carries it once descriptors are free again."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(10), watch_logs() as logs:
        async with tunnel([echo_handler]) as (ports, _relay, _agent):
            async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as first:
                assert await echo_exact(first, b"session up") == b"session up"
            client = trio.socket.socket()
            lowest_free = os.open(os.devnull, os.O_RDONLY)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                await client.connect((LOOPBACK, ports[0]))
                await logs.wait_for("accept returned EMFILE", "retrying in 0.1 seconds")
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            async with trio.SocketStream(client) as stream:
                assert await echo_exact(stream, b"after the shortage") == b"after the shortage"


async def test_session_without_an_epoll_carries_channels_with_tasks(
    monkeypatch: pytest.MonkeyPatch, carrier: str,
) -> None:
    """A session whose socket pump cannot get an epoll (out of descriptors just
    then) says so and carries its channels with tasks, instead of failing."""
    def no_epoll() -> NoReturn:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(pump.select, "epoll", no_epoll)
    with trio.fail_after(10), watch_logs() as logs:
        async with tunnel([echo_handler]) as (ports, _relay, _agent):
            async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as stream:
                assert await echo_exact(stream, b"carried") == b"carried"
    expected = 2 if carrier == "pump" else 0  # agent and relay
    assert len(logs.matching("no socket pump for this session", "Too many open files")) == expected


async def test_refused_target_closes_local_connection_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused destination resets the local connection within 1 s and says why."""
    caplog.set_level(logging.INFO)
    closed_port = await _unused_port()
    async with trio.open_nursery() as nursery:
        relay = await start_relay(nursery, relay_config())
        agent = await start_agent(nursery, agent_config(relay.ports[0], [closed_port]))
        with trio.fail_after(5):
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                with trio.fail_after(1):
                    await expect_reset(stream, b"hello")
        nursery.cancel_scope.cancel()
    expected = f"relay could not connect to {LOOPBACK}:{closed_port}: connection refused"
    assert any(expected in record.getMessage() for record in caplog.records), caplog.text


async def test_a_destination_reset_reaches_the_client_after_its_data() -> None:
    """The destination sends 100,000 bytes and resets: the client reads exactly those
    bytes, then ECONNRESET (not a clean, truncated end)."""
    data = pattern_block(b"then reset", 100_000)

    async def send_then_reset(stream: trio.SocketStream) -> None:
        await stream.send_all(data)
        await abort_stream(stream, after_sent=True)

    with trio.fail_after(10):
        async with tunnel([send_then_reset]) as (ports, _relay, _agent):
            async with await trio.open_tcp_stream(LOOPBACK, ports[0]) as client:
                assert await receive_until_reset(client) == data


async def test_a_client_reset_reaches_the_destination_after_its_data() -> None:
    """The client sends 100,000 bytes and resets: the destination reads those bytes,
    then ECONNRESET."""
    data = pattern_block(b"client then reset", 100_000)
    seen: list[bytes] = []
    done = trio.Event()

    async def read_until_reset(stream: trio.SocketStream) -> None:
        try:
            seen.append(await receive_until_reset(stream))
        finally:
            done.set()

    with trio.fail_after(10):
        async with tunnel([read_until_reset]) as (ports, _relay, _agent):
            client = await trio.open_tcp_stream(LOOPBACK, ports[0])
            await client.send_all(data)
            await abort_stream(client, after_sent=True)
            await done.wait()
    assert [len(x) for x in seen] == [len(data)]
    assert seen == [data]


async def test_a_relay_shutdown_past_its_drain_time_resets_both_ends() -> None:
    """A connection still open when the relay's drain time runs out is reset at the
    client and at the destination, neither told that the other end finished."""
    destination_end: list[bytes] = []
    done = trio.Event()

    async def hold(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(b"partial")
            destination_end.append(await receive_until_reset(stream))
        finally:
            done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, hold)
            relay = await start_relay(nursery, relay_config(drain_timeout=0.2))
            agent = await start_agent(nursery, agent_config(relay.ports[0], [target]))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as client:
                await client.send_all(b"request")
                assert await client.receive_some() == b"partial"
                relay.stop.set()
                assert await receive_until_reset(client) == b""
            await done.wait()
            nursery.cancel_scope.cancel()
    assert destination_end == [b"request"]


async def test_forbidden_destination_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """A destination outside the allow rules is refused and the agent logs it."""
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        target = await serve_target(nursery, echo_handler)
        relay = await start_relay(nursery, relay_config(allow=()))
        agent = await start_agent(nursery, agent_config(relay.ports[0], [target]))
        with trio.fail_after(5):
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as stream:
                await expect_reset(stream, b"hello")
        nursery.cancel_scope.cancel()
    assert any("not allowed" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("restarted", [False, True])
async def test_relay_restart_agent_reconnects_and_old_connections_close(
        restarted: bool) -> None:
    """After the relay dies, open connections are reset (not left hanging, not closed as
    if complete) and the agent reconnects: as soon as a restarted relay says it does not
    know the session, or once the resume grace is over (1 s here) if it stays away."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(resume_grace=1.0))
            port = relay.ports[0]
            agent = await start_agent(nursery, agent_config(port, [target]))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as old:
                await old.send_all(b"ping")
                assert await old.receive_some() == b"ping"
                relay.kill()
                await relay.finished.wait()
                if restarted:  # (a long grace: only the restart can explain the reset)
                    await start_relay(nursery, relay_config(listen=HostPort(LOOPBACK, port),
                                                            resume_grace=60.0))
                with trio.fail_after(3):
                    await expect_reset(old)
            if not restarted:
                await start_relay(nursery, relay_config(listen=HostPort(LOOPBACK, port)))
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as new:
                await new.send_all(b"again")
                assert await new.receive_some() == b"again"
            nursery.cancel_scope.cancel()


async def test_black_holed_relay_is_detected_by_ping_timeout() -> None:
    """A connection that stops answering without closing is dropped after the ping
    timeout; without resumption (resume_grace 0) its channels are reset."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config(resume_grace=0.0))
            hole = _BlackHole(relay.ports[0])
            hole_port = await nursery.start(hole.serve)
            agent = await start_agent(
                nursery, agent_config(hole_port, [target], ping_interval=0.2, ping_timeout=0.3)
            )
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as first:
                await first.send_all(b"one")
                assert await first.receive_some() == b"one"
                assert hole.connections == 1
                hole.freeze()
                with trio.fail_after(3):
                    await expect_reset(first)
            await hole.second_connection.wait()
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as second:
                await second.send_all(b"two")
                assert await second.receive_some() == b"two"
            nursery.cancel_scope.cancel()


async def test_a_black_holed_path_is_detected_and_the_session_resumed() -> None:
    """The same with resumption: after the ping timeout the agent reconnects, the
    relay drops its silent connection, and the open connection carries on."""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            target = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            hole = _BlackHole(relay.ports[0])
            hole_port = await nursery.start(hole.serve)
            agent = await start_agent(
                nursery, agent_config(hole_port, [target], ping_interval=0.2, ping_timeout=0.3)
            )
            async with await trio.open_tcp_stream(LOOPBACK, agent.ports[0]) as first:
                assert await echo_exact(first, b"one") == b"one"
                hole.freeze()
                assert await echo_exact(first, b"two") == b"two"
                assert hole.connections == 2
            nursery.cancel_scope.cancel()


class _BlackHole:
    """A TCP forwarder whose existing connections can be frozen (bytes dropped, no close)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.connections = 0
        self.frozen = False
        self.second_connection = trio.Event()

    def freeze(self) -> None:
        self.frozen = True

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async def handler(client: trio.SocketStream) -> None:
            self.connections += 1
            frozen_here = self.connections == 1
            if self.connections == 2:
                self.second_connection.set()
            async with client, await trio.open_tcp_stream(LOOPBACK, self.upstream) as server:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._copy, client, server, frozen_here)
                    nursery.start_soon(self._copy, server, client, frozen_here)

        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners)

    async def _copy(
        self, source: trio.SocketStream, sink: trio.SocketStream, freezable: bool
    ) -> None:
        async for data in source:
            if freezable and self.frozen:
                continue
            await sink.send_all(data)


async def _unused_port() -> int:
    sock = trio.socket.socket()
    await sock.bind((LOOPBACK, 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port
