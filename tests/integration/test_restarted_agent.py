"""An agent process that died and started again: the relay ends its old session at once.

The old session's secret died with the process, so its resume can never come:
the relay ends it (its channels reset) as soon as the same agent's successor
opens a session (``X-Wstunnel-Instance``, docs/PROTOCOL.md §12), instead of
holding it for the whole ``resume_grace``. A held session of another live
agent sharing the login (another daemon, a ``--stdio`` process) is left to
resume.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from benchmarks._children import agent_argv
from benchmarks._cutter import PathCutter
from wstunnel.addresses import HostPort
from wstunnel.agent.stdio import run_stdio

from .log_watch import LogWatch
from .process_helpers import Program, relay_process, wstunnel
from .tunnel_helpers import (
    LOOPBACK,
    agent_config,
    echo_exact,
    echo_handler,
    receive_until_reset,
    relay_config,
    serve_target,
    start_agent,
    start_relay,
)


def free_port() -> int:
    """A loopback port nobody listens on now (the relay binds it moments later)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


class Target:
    """An echo server that counts the connections it has and sees end."""

    def __init__(self) -> None:
        self.open = 0
        self.changed = trio.Event()

    async def handler(self, stream: trio.SocketStream) -> None:
        self._count(+1)
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass  # (a reset: the end this test waits for)
        finally:
            self._count(-1)
            await trio.aclose_forcefully(stream)

    def _count(self, step: int) -> None:
        self.open += step
        self.changed.set()
        self.changed = trio.Event()

    async def wait_open(self, count: int) -> None:
        while self.open != count:
            await self.changed.wait()


@asynccontextmanager
async def agent(relay_port: int, target: int, reverse_port: int
                ) -> AsyncIterator[tuple[Program, int]]:
    """A daemon agent process with one -L to ``target`` and one -R on ``reverse_port``;
    yields once its listener and the relay's are up, with its -L port."""
    argv = agent_argv(relay_port, [(0, target)], "-R", f"{reverse_port}:{LOOPBACK}:{target}")
    async with wstunnel(*argv) as program:
        with trio.fail_after(15):
            match = await program.wait_for(rb"forwarding 127\.0\.0\.1:(\d+) -> ")
            await program.wait_for(rb"relay listening on ")
        yield program, int(match[1])


async def test_a_restarted_agent_process_ends_its_old_session_at_once() -> None:
    """SIGKILL the agent and start it again with the same command line: the relay
    resets what the old session carried (a client on the relay's -R port, the -L
    destination it dialled) at once, not after resume_grace (60 s), and the new
    process's forwards work."""
    reverse_port = free_port()
    target = Target()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, target.handler)
            async with relay_process("--listen-allow", f"{LOOPBACK}:{reverse_port}") as (
                    relay, relay_port), AsyncExitStack() as streams:
                async with agent(relay_port, echo, reverse_port) as (first, local_port):
                    forward = await streams.enter_async_context(
                        await trio.open_tcp_stream(LOOPBACK, local_port))
                    client = await streams.enter_async_context(
                        await trio.open_tcp_stream(LOOPBACK, reverse_port))
                    assert await echo_exact(forward, b"-L") == b"-L"
                    assert await echo_exact(client, b"-R") == b"-R"
                    first.kill()
                    with trio.fail_after(10):
                        await relay.wait_for(rb"channels open to resume")
                async with agent(relay_port, echo, reverse_port) as (_, local_port):
                    with trio.fail_after(5):  # (the grace is 60 s)
                        assert await receive_until_reset(client) == b""
                        await target.wait_open(0)
                        line = await relay.wait_for(rb"session down: [^\n]*")
                    assert b"its agent restarted" in line[0]
                    async with await trio.open_tcp_stream(LOOPBACK, reverse_port) as client:
                        assert await echo_exact(client, b"-R again") == b"-R again"
                    async with await trio.open_tcp_stream(LOOPBACK, local_port) as forward:
                        assert await echo_exact(forward, b"-L again") == b"-L again"
            nursery.cancel_scope.cancel()


async def test_a_frozen_agent_replaced_before_its_loss_shows_ends_as_it_is_lost(
        tmp_path: Path) -> None:
    """The old process stops answering (SIGSTOP: its connection stays up) and a new one
    starts: the old session is left alone while its carrier is up, and ends the moment
    the relay finds it lost (no answer to pings), not resume_grace (60 s) later."""
    reverse_port = free_port()
    config = tmp_path / "relay.yaml"
    config.write_text(f"listen: {LOOPBACK}:0\nno_auth: true\nallow: [{LOOPBACK}]\n"
                      f"listen_allow: ['{LOOPBACK}:{reverse_port}']\n"
                      "ping_interval: 0.5\nping_timeout: 3\n")
    target = Target()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, target.handler)
            async with wstunnel("relay", "-c", str(config)) as relay:
                match = await relay.wait_for(rb"relay listening on 127\.0\.0\.1:(\d+)")
                relay_port = int(match[1])
                async with agent(relay_port, echo, reverse_port) as (frozen, _):
                    async with await trio.open_tcp_stream(LOOPBACK, reverse_port) as client:
                        assert await echo_exact(client, b"-R") == b"-R"
                        frozen.process.send_signal(signal.SIGSTOP)
                        async with agent(relay_port, echo, reverse_port):
                            assert b"open to resume" not in relay.log  # (its carrier is up)
                            with trio.fail_after(8):  # (the ping timeout, not the grace)
                                assert await receive_until_reset(client) == b""
                            line = await relay.wait_for(rb"session down: [^\n]*")
                    assert b"no answer to ping" in line[0]
                    assert b"its agent restarted" in line[0]
            nursery.cancel_scope.cancel()


async def _daemon_with_other_forwards(nursery: trio.Nursery, relay_port: int, echo: int,
                                      logs: LogWatch) -> None:
    """Another daemon with the same login: its forwards differ, so its identity does."""
    await start_agent(nursery, agent_config(relay_port, [echo, echo]))
    await logs.wait_for_count("session up for agent", 2)


async def _stdio_with_the_same_config(nursery: trio.Nursery, relay_port: int, echo: int,
                                      logs: LogWatch) -> None:
    """A ``--stdio`` run from the same configuration: it names no instance."""
    stdio, ssh = trio.testing.memory_stream_pair()
    config = agent_config(relay_port, [echo])
    nursery.start_soon(run_stdio, config, HostPort(LOOPBACK, echo), stdio)
    await logs.wait_for_count("session up for agent", 2)
    await ssh.send_all(b"stdio")
    got = b""
    while len(got) < 5:
        got += await ssh.receive_some()
    assert got == b"stdio"


@pytest.mark.parametrize("other", [_daemon_with_other_forwards, _stdio_with_the_same_config],
                         ids=["daemon", "stdio"])
async def test_another_agent_with_the_same_login_leaves_a_held_session_to_resume(
        logs: LogWatch, other: object) -> None:
    """While a daemon's path is cut (its session held, waiting for its resume), another
    agent with the same login opens a session: the held one is not ended; once the
    path is back it resumes and its connection carries on."""
    assert callable(other)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            echo = await serve_target(nursery, echo_handler)
            relay = await start_relay(nursery, relay_config())
            cutter = PathCutter(relay.ports[0])
            await nursery.start(cutter.serve)
            first = await start_agent(nursery, agent_config(cutter.port, [echo]))
            async with await trio.open_tcp_stream(LOOPBACK, first.ports[0]) as stream:
                assert await echo_exact(stream, b"before") == b"before"
                cutter.down = True
                cutter.cut()
                await logs.wait_for_count("open to resume", 2)  # (the agent's and the relay's)
                await other(nursery, relay.ports[0], echo, logs)
                cutter.down = False
                with trio.fail_after(5):
                    await logs.wait_for_count("session resumed", 2)
                assert await echo_exact(stream, b"after") == b"after"
            assert not any("agent restarted" in line for line in logs.lines)
            nursery.cancel_scope.cancel()
